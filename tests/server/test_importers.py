"""Importers of real DiffusionGemma captures (server/importers): formats, fill rules, labels, refusals.

Part (a) builds small synthetic captures inside each test (nothing is copied
from the real data) and checks each format round-trips into traces with the
right canvas, steps, final tokens and commit order, that each malformed input
is refused with one line naming file and field, and that both probability
rules give valid top-k rows. Part (b) imports the real captures from
../shared/real (skipped where absent) and writes its outputs to tmp_path only:
neither the data nor anything made from it is ever committed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from canvaswatch.client.tensors import decode_array
from canvaswatch.client.trace import read_traces, write_traces
from canvaswatch.server.importers import FORMATS, CaptureError, import_capture
from canvaswatch.server.importers.canvas import ROLE_ANSWER, ROLE_REASONING
from canvaswatch.server.importers.rules import EntropyRule, geometric_topk, load_curves
from canvaswatch.server.importers.text import PLACEHOLDER_BASE, encode_text, parse_ranges, ranges

REAL = Path(__file__).parents[2].parent / "shared" / "real"
VOCAB = 262_144


class CharEncoder:
    """A stand-in vocabulary: one id per character (1000 + code point)."""

    size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [1000 + ord(c) for c in text]


def topk(trace):
    """(ids [T, L, k], probs [T, L, k]) of a trace's non-final steps."""
    steps = [s for s in trace.steps if not s.final]
    ids = np.stack([decode_array(s.topk.ids, "ids", ndim=2) for s in steps])
    probs = np.stack([decode_array(s.topk.probs, "probs", ndim=2) for s in steps])
    return ids, probs


def last_change(argmax: np.ndarray) -> np.ndarray:
    changed = np.zeros(argmax.shape, dtype=bool)
    changed[1:] = argmax[1:] != argmax[:-1]
    return np.where(changed.any(axis=0), argmax.shape[0] - 1 - np.argmax(changed[::-1], axis=0), 0)


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- synthetic captures

def gallery_run(name="count_fix", why="Says 'nine' first, then revises to 'ten'.", steps=6, length=10, seed=0,
                label="count repair"):
    rng = np.random.default_rng(seed)
    frames = rng.integers(2, VOCAB, size=(steps, length))
    frames[:, -2:] = 0  # padding at the end
    for t in range(1, steps):  # positions settle left to right, one more each step
        frames[t, :t] = frames[t - 1, :t]
    frames[2:] = frames[-1]
    committed = (np.arange(steps)[:, None] >= np.arange(length)[None, :] // 2).astype(int)
    return {"name": name, "label": label, "why": why, "T": steps, "C": length,
            "params": {"seed": 1, "t_max": 0.8, "t_min": 0.4, "entropy_bound": 0.1}, "pad_ids": [0, 1],
            "t_end": 3, "frames": frames.tolist(), "committed": committed.tolist(), "id2str": {}, "outcome": None}


def clean_run(answers=("3", "5"), length=16):
    final = [1000 + ord("5"), 1000 + ord("\n")] + [2000 + i for i in range(9)] + [1] + [0] * (length - 12)
    return {"pid": "toy", "cat": "count", "hard": False, "seed": 0, "q": "How many?", "correct_ans": "5",
            "lure": "3", "model_ans": "5", "is_correct": True, "ans_pos": [0], "ans_lock": [3],
            "cot_pos": list(range(2, 11)), "cot_lock": [0, 1, 2, 2, 3, 4, 1, 0, 5], "n_cot": 9,
            "answer_traj": list(answers), "n_flips": len(answers) - 1, "final_ids": final}


def order_run(bench="math", pid="m_001", text="<|channel>thought\n<channel|>Two plus two", steps=6, n=40):
    content = list(range(n))
    lock = [min(i // 10, steps - 1) for i in range(n)]  # left to right
    return {"bench": bench, "pid": pid, "T": steps, "content": content, "lock": lock, "final_text": text}


def films_run(lock=None, steps=8):
    lock = lock if lock is not None else [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    return {"task": "reverse_chain", "depth": 3, "T": steps, "seed": 7, "ok": True,
            "content": list(range(len(lock))), "lock": lock}


def curves(tmp_path: Path) -> Path:
    return write(tmp_path, "anim_curves.json", {
        "toy": {"ans_curve": [1.0, 0.5, 0.1], "cot_curve": [3.0, 2.0, 1.0, 0.2], "ans": "5", "ok": True},
        "other": {"ans_curve": [0.2, 0.1], "cot_curve": [2.0, 1.0]},
        "absent": None,
    })


# ---------------------------------------------------------------- (a) formats round-trip

def test_gallery_frames_pass_through_with_the_committed_mask(tmp_path):
    runs = [gallery_run(), gallery_run(name="plain", why="Nothing happens.", seed=1, label="plain")]
    path = write(tmp_path, "gallery.json", runs)
    traces = import_capture("gallery", path, k=4)
    assert len(traces) == 2
    for trace, run in zip(traces, runs):
        frames = np.array(run["frames"])
        ids, probs = topk(trace)
        assert trace.info.canvas_length == 10 and trace.info.total_steps == 6 and ids.shape == (6, 10, 4)
        assert (ids[..., 0] == frames).all()  # real ids unchanged
        assert list(trace.steps[-1].output_ids) == run["frames"][-1] and trace.steps[-1].final
        committed = np.array(run["committed"], dtype=bool)
        assert (probs[..., 0][committed] >= 0.9).all() and (probs[..., 0][~committed] <= 0.35).all()
    first = traces[0].info.attributes
    assert first["labels"] == "self_correction" and first["source"] == "real:gallery.json"
    assert first["rule"] == "committed" and first["regime"] == "default" and first["curated"] == "true"
    assert first["labelled"] == "self_correction"
    assert traces[1].info.attributes["labels"] == "" == traces[1].info.attributes["labelled"]
    assert traces[0].steps[0].info.request_id == traces[0].info.request_id == "real-gallery-count_fix"


def test_sampler_signals_ride_on_each_step_and_say_where_they_come_from(tmp_path):
    run = gallery_run()
    (trace,) = import_capture("gallery", write(tmp_path, "gallery.json", [run]))
    steps = trace.steps[:-1]
    accepted = np.stack([decode_array(s.accepted, "accepted", ndim=1) for s in steps])
    argmax = np.stack([decode_array(s.argmax_ids, "argmax_ids", ndim=1) for s in steps])
    entropy = np.stack([decode_array(s.entropy, "entropy", ndim=1) for s in steps]).astype(np.float64)
    assert (accepted == np.array(run["committed"])).all() and (argmax == np.array(run["frames"])).all()
    assert np.isfinite(entropy).all() and (entropy >= 0).all()
    committed = np.array(run["committed"], dtype=bool)
    assert entropy[committed].max() < entropy[~committed].min()
    assert np.allclose([s.temperature for s in steps], np.linspace(0.8, 0.4, 6))
    assert trace.info.attributes["signals"] == "argmax_ids:real,accepted:real,entropy:rule:committed,temperature:params"
    films = import_capture("films", write(tmp_path, "films_order.json", [films_run()]))[0]
    assert films.info.attributes["signals"] == "argmax_ids:rebuilt,accepted:derived,entropy:rule:committed"
    assert not films.steps[0].HasField("temperature")
    (bare,) = import_capture("gallery", tmp_path / "gallery.json", signals=False)
    assert not bare.steps[0].HasField("accepted") and "signals" not in bare.info.attributes


@pytest.mark.parametrize("why, labels", [
    ("The planted report is wiped in ONE step; skeleton-first story formation follows.",
     "intermediate_context,non_chronological"),
    ("Content words crystallize ~30 steps before the filler between them resolves.", "non_chronological"),
    ("Last positions pinned to a closing sentence; the middle bridges into it.", "non_chronological"),
    ("Hot regime buys the extra revision room.", ""),
    # what a run lacks is no label; other verb forms of the same phenomena are
    ("The count is never revised; traps are absorbing.", ""),
    ("No repair happens, the margin stays locked.", ""),
    ("It does not revise at first; later it repairs the count.", "self_correction"),
    ("Self-corrects 'eight' to 'seven'.", "self_correction"),
    ("The planted text is erased in one step.", "intermediate_context"),
    ("The correct answer is written from the start.", ""),
    ("The count doesn\u2019t get revised.", ""),                        # a typographic apostrophe
    ("Nothing is wiped; without a prompt swap the story holds.", ""),
    ("Says 'no' with no hesitation and revises to 'yes'.", "self_correction"),  # quotes, then a new clause
    ("The prompt is rewritten at t=2 and corrected later.", ""),        # interventions, not the model's revision
])
def test_gallery_labels_follow_what_the_run_says(tmp_path, why, labels):
    path = write(tmp_path, "gallery.json", [gallery_run(why=why, label="story")])
    attributes = import_capture("gallery", path)[0].info.attributes
    assert attributes["labels"] == labels
    # the phrases behind each label, for a person to check new wording against
    assert [part.split(":")[0] for part in attributes["label_evidence"].split("; ") if part] == labels.split(",") * bool(labels)


def test_clean_rebuilds_commit_order_and_answer_trajectory(tmp_path):
    path = write(tmp_path, "clean.json", {"toy__0": clean_run(), "toy__1": clean_run(answers=("5",))})
    traces = import_capture("clean", path, canvas_length=16, encoder=CharEncoder())
    assert len(traces) == 2
    revised, stable = traces
    run = clean_run()
    ids, probs = topk(revised)
    final = np.array(run["final_ids"])
    assert revised.info.canvas_length == 16 and ids.shape[0] == 48 == revised.info.total_steps
    assert list(revised.steps[-1].output_ids) == run["final_ids"]
    # commit order: each reasoning position's argmax last changes exactly at its lock step, then holds
    lock = np.zeros(16, dtype=int)
    lock[run["cot_pos"]] = run["cot_lock"]
    cot = np.array(run["cot_pos"])
    assert (last_change(ids[..., 0])[cot] == lock[cot]).all()
    assert (ids[lock[cot], cot, 0] == final[cot]).all()
    # the answer span shows "3" from step 0, the final "5" from its lock (step 3): the shown answers, in order
    answer = ids[:, 0, 0]
    assert (answer[:3] == 1000 + ord("3")).all() and (answer[3:] == final[0]).all()
    a = revised.info.attributes
    assert a["labels"] == "self_correction" and a["answers"] == '["3", "5"]' and a["answer_steps"] == "0,3"
    assert a["labelled"] == "self_correction,non_chronological" and a["label_positions.self_correction"] == "0"
    assert a["answer_positions"] == "0" and a["reasoning_positions"] == "2-10" and a["model_answer"] == "5"
    assert "answer_timing" in a["filled"] and a["source"] == "real:clean.json"
    assert list(revised.info.prompt_ids) == CharEncoder().encode("How many?")
    # one answer: the span shows it all along (a shown answer before its lock), no revision label
    s_ids, s_probs = topk(stable)
    assert (s_ids[:, 0, 0] == final[0]).all() and stable.info.attributes["labels"] == ""
    assert ((s_probs[:3, 0, 0] >= 0.45) & (s_probs[:3, 0, 0] <= 0.85)).all() and (s_probs[3:, 0, 0] >= 0.9).all()


def test_clean_steps_option_and_answers_cut_or_padded_to_the_span(tmp_path):
    run = clean_run(answers=("12", "5"))
    path = write(tmp_path, "clean.json", {"r": run})
    (trace,) = import_capture("clean", path, canvas_length=16, steps=7, encoder=CharEncoder())
    ids, _ = topk(trace)
    assert ids.shape[0] == 7 and (ids[:3, 0, 0] == 1000 + ord("1")).all()  # "12" cut to the 1-position span


@pytest.mark.parametrize("answers, shown", [
    (("5", "5"), ["5"]), (("5 ", "5"), ["5"]), (("", "5"), ["5"]),       # one answer, listed twice or filled in
    (("3", "5", "5"), ["3", "5"]), (("5", "3", "5"), ["5", "3", "5"]),  # revised, back and forth
])
def test_clean_counts_the_distinct_answers_shown(tmp_path, answers, shown):
    path = write(tmp_path, "clean.json", {"r": clean_run(answers=answers)})
    (trace,) = import_capture("clean", path, encoder=CharEncoder())
    a = trace.info.attributes
    assert json.loads(a["answers"]) == shown
    assert a["labels"] == ("self_correction" if len(shown) > 1 else "")
    assert a["labelled"] == "self_correction,non_chronological"


def test_clean_answers_that_show_the_same_on_the_span_are_one_answer(tmp_path):
    # a one-position span: "50" and "5" both show '5' there, so the trace cannot show a revision
    (same,) = import_capture("clean", write(tmp_path, "clean.json", {"r": clean_run(answers=("50", "5"))}),
                             encoder=CharEncoder())
    a = same.info.attributes
    assert a["labels"] == "" and a["labelled"] == "non_chronological" and json.loads(a["answers"]) == ["50"]
    (shown,) = import_capture("clean", write(tmp_path, "clean.json", {"r": clean_run(answers=("50", "3", "5"))}),
                              encoder=CharEncoder())
    assert json.loads(shown.info.attributes["answers"]) == ["50", "3", "5"]
    assert shown.info.attributes["labels"] == "self_correction"


def test_clean_without_an_answer_trajectory_is_no_negative_for_self_correction(tmp_path):
    path = write(tmp_path, "clean.json", {"r": clean_run(answers=())})
    (trace,) = import_capture("clean", path, encoder=CharEncoder())
    a = trace.info.attributes
    assert a["labelled"] == "non_chronological" and "label_positions.self_correction" not in a


def test_clean_reads_the_canvas_length_and_steps_the_run_records(tmp_path):
    run = clean_run(length=20)  # no canvas_length given: the canvas is final_ids' own length
    run["T"] = 9
    path = write(tmp_path, "clean.json", {"r": run})
    (trace,) = import_capture("clean", path, encoder=CharEncoder())
    assert trace.info.canvas_length == 20 and trace.info.total_steps == 9
    run["cot_lock"][0] = 9
    write(tmp_path, "clean.json", {"r": run})
    with pytest.raises(CaptureError, match=r"r\.cot_lock\[0\]: lock step 9 is beyond T = 9 steps"):
        import_capture("clean", path, encoder=CharEncoder())
    (given,) = import_capture("clean", path, steps=12, encoder=CharEncoder())  # --steps wins over T
    assert given.info.total_steps == 12
    run["T"] = 10**7  # a sentinel, not a step count: refused, not rebuilt into 10 million canvases
    write(tmp_path, "clean.json", {"r": run})
    with pytest.raises(CaptureError, match=r"r\.T: 10000000 is outside \[1, 10000\]"):
        import_capture("clean", path, encoder=CharEncoder())
    run.pop("T")
    run["cot_lock"][0] = 10**7  # likewise a lock step where no T is known
    write(tmp_path, "clean.json", {"r": run})
    with pytest.raises(CaptureError, match=r"r\.cot_lock\[0\]: 10000000 is outside \[0, 10000\)"):
        import_capture("clean", path, encoder=CharEncoder())


def test_clean_answers_that_are_not_plain_numbers_keep_their_text(tmp_path):
    run = clean_run(answers=("\u00b2", "5"))  # str.isdigit() is true for '²', int() is not
    (trace,) = import_capture("clean", write(tmp_path, "clean.json", {"r": run}), encoder=CharEncoder())
    ids, _ = topk(trace)
    assert ids[0, 0, 0] == 1000 + ord("\u00b2") and trace.info.attributes["labels"] == "self_correction"


def test_order_records_take_the_canvas_the_run_records_or_its_content_needs(tmp_path):
    run = order_run(n=40)
    run["C"] = 64
    (trace,) = import_capture("bench_order", write(tmp_path, "bench_order.json", [run]), encoder=CharEncoder())
    assert trace.info.canvas_length == 64
    with pytest.raises(CaptureError, match=r"\[0\]\.C: the run records a canvas of 64 positions, not the 80 required"):
        import_capture("bench_order", tmp_path / "bench_order.json", canvas_length=80, encoder=CharEncoder())
    run["content"][-1] = 64
    with pytest.raises(CaptureError, match=r"\[0\]\.content\[39\]: 64 is outside \[0, 64\)"):
        import_capture("bench_order", write(tmp_path, "bench_order.json", [run]), encoder=CharEncoder())
    run.pop("C")
    run["content"] = [c + 260 for c in range(40)]  # past the capture's usual 256 positions
    (trace,) = import_capture("bench_order", write(tmp_path, "bench_order.json", [run]), encoder=CharEncoder())
    assert trace.info.canvas_length == 300


def _short_clean():
    run = clean_run(answers=("5",))
    run["cot_pos"], run["cot_lock"] = [2, 3, 4], [0, 1, 2]  # with the answer, 4 content positions
    return {"r": run}


@pytest.mark.parametrize("fmt, file, data, labelled", [
    ("films", "films_order.json", [films_run(lock=[0, 1, 2, 3])], ""),
    ("bench_order", "bench_order.json", [order_run(n=5, text="ab")], ""),
    ("clean", "clean.json", _short_clean(), "self_correction"),
])
def test_a_commit_order_too_short_to_judge_is_no_negative(tmp_path, fmt, file, data, labelled):
    (trace,) = import_capture(fmt, write(tmp_path, file, data), encoder=CharEncoder())
    a = trace.info.attributes
    assert a["late_first"] == "unknown" and a["labels"] == "" and a["labelled"] == labelled


@pytest.mark.parametrize("fmt, option, message", [
    ("gallery", {"steps": 3}, "steps: the gallery capture records its own; only clean takes it"),
    ("gallery", {"canvas_length": 12}, "canvas_length: the gallery capture records its own; only clean, bench_order"),
    ("films", {"steps": 3}, "steps: the films capture records its own"),
    ("clean", {"steps": 10**6}, "steps must be in [1, 10000]"),
])
def test_a_shape_option_a_format_does_not_read_is_refused(tmp_path, fmt, option, message):
    with pytest.raises(ValueError) as err:
        import_capture(fmt, tmp_path / "any.json", **option)
    assert str(err.value).startswith(message), err.value


@pytest.mark.parametrize("fmt, file, data", [("gallery", "gallery.json", []), ("clean", "clean.json", {})])
def test_a_capture_with_no_runs_is_refused(tmp_path, fmt, file, data):
    with pytest.raises(CaptureError, match=rf"^{file}: \(top level\): no runs in the file"):
        import_capture(fmt, write(tmp_path, file, data))


@pytest.mark.parametrize("fmt, file, bench", [("bench_order", "bench_order.json", "math"),
                                              ("poem", "poem_order.json", "poem")])
def test_order_records_put_the_text_then_placeholders_then_padding(tmp_path, fmt, file, bench):
    text = "<|channel>thought\n<channel|>Two plus two"
    runs = [order_run(bench=bench, text=text), order_run(bench=bench, pid="cut", text="x" * 300, n=350)]
    path = write(tmp_path, file, runs)
    traces = import_capture(fmt, path, canvas_length=400, encoder=CharEncoder())
    assert len(traces) == 2
    whole, cut = traces
    ids, _ = topk(whole)
    expected = encode_text(CharEncoder(), text)
    assert expected[:4] == [100, 1000 + ord("t"), 1000 + ord("h"), 1000 + ord("o")]
    output = np.array(whole.steps[-1].output_ids)
    assert output.shape == (400,) and ids.shape == (6, 400, 4) and whole.info.total_steps == 6
    n = len(expected)
    assert output[:n].tolist() == expected
    assert (output[n:40] == PLACEHOLDER_BASE + np.arange(n, 40)).all() and (output[40:] == 0).all()
    lock = np.array(runs[0]["lock"])
    assert (last_change(ids[..., 0])[:40] == lock).all()
    a = whole.info.attributes
    assert a["text_positions"] == f"0-{n - 1}" and a["placeholder_positions"] == f"{n}-39"
    assert a["bench"] == bench and a["labels"] == "" and a["late_first"] == "false"
    assert a["labelled"] == "non_chronological"
    # 300 characters: the capture cut the text, so its last (possibly split) token is dropped
    cut_output = np.array(cut.steps[-1].output_ids)
    assert (cut_output[:299] == 1000 + ord("x")).all() and cut_output[299] == PLACEHOLDER_BASE + 299
    assert cut.info.attributes["text_truncated"] == "true"


def test_films_use_placeholders_and_label_late_first_order(tmp_path):
    late = [5, 5, 4, 4, 3, 2, 1, 0, 0, 0]
    path = write(tmp_path, "films_order.json", [films_run(), films_run(lock=late)])
    chronological, backwards = import_capture("films", path)
    ids, _ = topk(backwards)
    assert backwards.info.canvas_length == 10 and ids.shape == (8, 10, 4)
    assert list(backwards.steps[-1].output_ids) == (PLACEHOLDER_BASE + np.arange(10)).tolist()
    assert (last_change(ids[..., 0]) == np.array(late)).all()
    assert backwards.info.attributes["labels"] == "non_chronological"
    assert chronological.info.attributes["labels"] == ""
    assert backwards.info.request_id == "real-films-001-reverse_chain-d3-s7"


def test_imports_are_reproducible_and_seeded(tmp_path):
    path = write(tmp_path, "films_order.json", [films_run()])
    first = import_capture("films", path)[0].SerializeToString()
    assert import_capture("films", path)[0].SerializeToString() == first
    assert import_capture("films", path, seed=1)[0].SerializeToString() != first


# ---------------------------------------------------------------- (a) both rules give valid probabilities

@pytest.mark.parametrize("rule", ["committed", "entropy"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_both_rules_give_sorted_probabilities_summing_to_at_most_one(tmp_path, rule, k):
    curves(tmp_path)
    path = write(tmp_path, "clean.json", {"toy__0": clean_run()})
    gallery = write(tmp_path, "gallery.json", [gallery_run()])
    traces = (import_capture("clean", path, rule=rule, k=k, canvas_length=16, encoder=CharEncoder())
              + import_capture("gallery", gallery, rule=rule, k=k))
    for trace in traces:
        ids, probs = topk(trace)
        assert ids.shape[-1] == k and trace.info.attributes["rule"] == rule
        assert np.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(-1) <= 1 + 1e-6).all()
        assert (np.diff(probs, axis=-1) <= 1e-7).all()  # most probable first
        kept = probs > 0
        assert (ids[kept] >= 0).all() and (ids[kept] < VOCAB).all()
        for row in ids.reshape(-1, k)[:200]:  # kept ids are distinct within a row
            nonpad = row[row != 0]
            assert len(set(nonpad.tolist())) == len(nonpad)


def test_committed_rule_masses(tmp_path):
    path = write(tmp_path, "gallery.json", [gallery_run()])
    (trace,) = import_capture("gallery", path, k=4)
    _, probs = topk(trace)
    committed = np.array(gallery_run()["committed"], dtype=bool)
    undecided = probs[~committed]
    assert ((undecided[:, 0] >= 0.15) & (undecided[:, 0] <= 0.35)).all()
    assert ((undecided[:, 1:] >= 0.1 - 1e-6) & (undecided[:, 1:] <= 0.25 + 1e-6)).all()
    assert (probs[committed][:, 0] >= 0.9).all()


def test_committed_rule_holds_a_shown_answer_between_drafts_and_decided_tokens(tmp_path):
    # answer positions start at 0.0-2.1 nats in the real curves, never at reasoning's 1.2-3.9:
    # before its lock a shown answer is firmer than a draft and less firm than a committed token
    path = write(tmp_path, "clean.json", {"toy__0": clean_run(answers=("3", "5"))})
    (trace,) = import_capture("clean", path, k=4, canvas_length=16, encoder=CharEncoder())
    _, probs = topk(trace)
    accepted = np.stack([np.frombuffer(s.accepted.data, dtype=np.uint8) for s in trace.steps[:-1]]).astype(bool)
    answer_before_lock = probs[:3, 0, 0]  # ans_pos [0], ans_lock [3]
    assert not accepted[:3, 0].any()
    assert ((answer_before_lock >= 0.45) & (answer_before_lock <= 0.85)).all()
    assert (probs[3:, 0, 0] >= 0.9).all()
    drafts = probs[:, 2:11][~accepted[:, 2:11]][:, 0]
    assert drafts.size and (drafts <= 0.35).all()


def test_entropy_rule_follows_the_curves_role_by_role(tmp_path):
    from canvaswatch.server.importers import clean
    from canvaswatch.server.importers.options import ImportOptions

    (run,) = clean.read(write(tmp_path, "clean.json", {"toy__0": clean_run()}),
                        ImportOptions(canvas_length=16, encoder=CharEncoder()))
    rule = EntropyRule(load_curves(curves(tmp_path)))
    target, which = rule.target_entropy(run)
    assert which == "toy"
    cot = run.roles == ROLE_REASONING
    assert np.allclose(target[:4, cot].mean(axis=1), [3.0, 2.0, 1.0, 0.2])
    assert np.allclose(target[4:, cot].mean(axis=1), 0.2)  # past the curve, its last value holds
    assert np.allclose(target[:3, run.roles == ROLE_ANSWER].mean(axis=1), [1.0, 0.5, 0.1])
    undecided = ~run.decided[1] & cot
    assert target[1, undecided].min() > target[1, run.decided[1] & cot].max()  # undecided carry more
    # the kept probabilities come from a distribution of exactly that entropy
    full = geometric_topk(np.array([0.5, 2.0, 3.5]), 1024)
    entropy = -(full * np.log(np.maximum(full, 1e-300))).sum(-1)
    assert np.allclose(entropy, [0.5, 2.0, 3.5], atol=1e-3)


def test_entropy_rule_without_curves_is_refused(tmp_path):
    path = write(tmp_path, "films_order.json", [films_run()])
    with pytest.raises(CaptureError, match=r"^anim_curves\.json: \(file\): .*not found"):
        import_capture("films", path, rule="entropy")
    mean = import_capture("films", path, rule="entropy", curves=curves(tmp_path))[0]
    assert mean.info.attributes["curves"] == "anim_curves.json:mean"


# ---------------------------------------------------------------- (a) malformed input

def _clean(mutate):
    run = clean_run()
    mutate(run)
    return "clean.json", {"r": run}


def _order(mutate, file="bench_order.json"):
    run = order_run()
    mutate(run)
    return file, [run]


def _gallery(mutate):
    run = gallery_run()
    mutate(run)
    return "gallery.json", [run]


def _films(mutate):
    run = films_run()
    mutate(run)
    return "films_order.json", [run]


MALFORMED = [
    ("clean", _clean(lambda r: r.pop("final_ids")), "clean.json: r.final_ids: missing"),
    ("clean", _clean(lambda r: r["final_ids"].pop()), "clean.json: r.final_ids: expected 16 integers, got 15"),
    ("clean", _clean(lambda r: r["final_ids"].__setitem__(3, "x")), "clean.json: r.final_ids[3]: expected an integer"),
    ("clean", _clean(lambda r: r["final_ids"].__setitem__(4, 2.5)), "clean.json: r.final_ids[4]: expected an integer"),
    ("clean", _clean(lambda r: r["final_ids"].__setitem__(5, VOCAB)),
     "clean.json: r.final_ids[5]: 262144 is outside [0, 262144)"),
    ("clean", _clean(lambda r: r["cot_lock"].pop()), "clean.json: r.cot_lock: expected 9 lock steps, got 8"),
    ("clean", _clean(lambda r: r["cot_pos"].__setitem__(0, 0)), "clean.json: r.cot_pos: position 0 is also in ans_pos"),
    ("clean", _clean(lambda r: r["ans_pos"].__setitem__(0, 16)), "clean.json: r.ans_pos[0]: 16 is outside [0, 16)"),
    ("clean", _clean(lambda r: r.__setitem__("answer_traj", ["1", "2", "3", "4", "5"])),
     "clean.json: r.answer_traj: 5 answers need 4 changes"),
    ("clean", _clean(lambda r: r["answer_traj"].__setitem__(0, 3)), "clean.json: r.answer_traj[0]: expected a string"),
    ("clean", ("clean.json", [clean_run()]), "clean.json: (top level): expected an object"),
    ("bench_order", _order(lambda r: r["lock"].__setitem__(2, 6)),
     "bench_order.json: [0].lock[2]: lock step 6 is beyond T = 6 steps"),
    ("bench_order", _order(lambda r: r.pop("final_text")), "bench_order.json: [0].final_text: missing"),
    ("bench_order", _order(lambda r: r.__setitem__("T", "48")), "bench_order.json: [0].T: expected an integer"),
    ("bench_order", _order(lambda r: r["content"].__setitem__(1, 0)),
     "bench_order.json: [0].content: a position is listed twice"),
    ("bench_order", _order(lambda r: r.__setitem__("final_text", "y" * 50)),
     "bench_order.json: [0].final_text: tokenises to 50 ids, more than the 40 content positions"),
    ("poem", _order(lambda r: r["lock"].append(0), "poem_order.json"),
     "poem_order.json: [0].lock: expected 40 lock steps, got 41"),
    ("gallery", _gallery(lambda r: r["frames"][2].pop()), "gallery.json: [0].frames[2]: expected 10 ids, got 9"),
    ("gallery", _gallery(lambda r: r["frames"].pop()), "gallery.json: [0].frames: expected 6 rows, got 5"),
    ("gallery", _gallery(lambda r: r["frames"][1].__setitem__(3, -1)), "gallery.json: [0].frames[1][3]: -1 is outside"),
    ("gallery", _gallery(lambda r: r["committed"][0].__setitem__(0, 2)),
     "gallery.json: [0].committed[0][0]: 2 is outside [0, 2)"),
    ("gallery", _gallery(lambda r: r["params"].pop("t_max")), "gallery.json: [0].params.t_max: missing"),
    ("gallery", _gallery(lambda r: r.__setitem__("frames", None)), "gallery.json: [0].frames: expected a list"),
    ("films", _films(lambda r: r["lock"].__setitem__(0, 8)), "films_order.json: [0].lock[0]: lock step 8 is beyond T"),
    ("films", _films(lambda r: r["content"].__setitem__(0, True)),
     "films_order.json: [0].content[0]: expected an integer, got a boolean"),
    ("films", ("films_order.json", [films_run(), "oops"]), "films_order.json: [1]: expected an object"),
]


@pytest.mark.parametrize("fmt, capture, message", MALFORMED, ids=[m[2].split(":", 2)[1].strip() + " " +
                                                                   m[2].rsplit(":", 1)[-1].strip()[:30]
                                                                   for m in MALFORMED])
def test_malformed_input_is_refused_naming_file_and_field(tmp_path, fmt, capture, message):
    file, data = capture
    path = write(tmp_path, file, copy.deepcopy(data))
    with pytest.raises(CaptureError) as err:
        import_capture(fmt, path, canvas_length=16 if fmt == "clean" else None, encoder=CharEncoder())
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text and err.value.file == file


def test_malformed_runs_can_be_left_out_and_named_instead_of_refusing_the_file(tmp_path):
    late = films_run()
    late["lock"][0] = 8
    path = write(tmp_path, "films_order.json", [films_run(), "oops", late, films_run(lock=[5, 5, 4, 4, 3, 2, 1, 0, 0, 0])])
    with pytest.raises(CaptureError, match=r"\[1\]: expected an object"):
        import_capture("films", path)
    skipped: list[CaptureError] = []
    traces = import_capture("films", path, on_invalid=skipped.append)
    assert [t.info.attributes["name"] for t in traces] == ["000-reverse_chain-d3-s7", "003-reverse_chain-d3-s7"]
    assert [str(e).split(":")[1].strip() for e in skipped] == ["[1]", "[2].lock[0]"]
    write(tmp_path, "films_order.json", ["oops"])
    with pytest.raises(CaptureError, match="no valid runs in the file"):
        import_capture("films", path, on_invalid=skipped.append)


def test_a_capture_in_another_format_gets_a_hint(tmp_path):
    with pytest.raises(CaptureError, match=r"expected an object of runs keyed by name \(this one is a list: another"):
        import_capture("clean", write(tmp_path, "gallery.json", [gallery_run()]))
    with pytest.raises(CaptureError, match=r"expected a list of runs \(this one is an object: clean.json's format\?\)"):
        import_capture("gallery", write(tmp_path, "clean.json", {"r": clean_run()}))


def test_unreadable_files_and_bad_arguments(tmp_path):
    bad = tmp_path / "gallery.json"
    bad.write_text("{not json")
    with pytest.raises(CaptureError, match=r"^gallery\.json: \(file\): not JSON"):
        import_capture("gallery", bad)
    with pytest.raises(CaptureError, match=r"^absent\.json: \(file\): cannot read"):
        import_capture("gallery", tmp_path / "absent.json")
    with pytest.raises(ValueError, match="unknown capture format 'nope'"):
        import_capture("nope", bad)
    with pytest.raises(ValueError, match="unknown rule"):
        import_capture("gallery", bad, rule="uniform")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        import_capture("gallery", bad, colour=1)


def test_import_command_writes_the_traces(tmp_path, capsys):
    from canvaswatch.server.cli import main

    path = write(tmp_path, "films_order.json", [films_run(), films_run(lock=[5, 5, 4, 4, 3, 2, 1, 0, 0, 0])])
    curves(tmp_path)
    out = tmp_path / "films.cwtrace"
    assert main(["import", "films", str(path), "-o", str(out), "--rule", "entropy", "--k", "3"]) == 0
    traces = list(read_traces(out))
    assert len(traces) == 2 and traces[1].info.attributes["labels"] == "non_chronological"
    assert traces[0].info.attributes["rule"] == "entropy" and topk(traces[0])[0].shape[-1] == 3
    assert "wrote 2 traces from films_order.json" in capsys.readouterr().out


def test_import_command_passes_canvas_length_and_steps(tmp_path, capsys, monkeypatch):
    from canvaswatch.server import cli
    from canvaswatch.server.importers import options

    monkeypatch.setattr(options, "load_encoder", lambda spec=None: CharEncoder())  # the toy run's ids
    path = write(tmp_path, "clean.json", {"r": clean_run()})
    out = tmp_path / "clean.cwtrace"
    assert cli.main(["import", "clean", str(path), "-o", str(out), "--steps", "7", "--canvas-length", "16"]) == 0
    (trace,) = read_traces(out)
    assert trace.info.total_steps == 7 and trace.info.canvas_length == 16
    assert cli.main(["import", "clean", str(path), "-o", str(out), "--canvas-length", "20"]) == 2
    assert "r.final_ids: expected 20 integers, got 16" in capsys.readouterr().err


def test_import_command_skips_malformed_runs_when_asked(tmp_path, capsys):
    from canvaswatch.server.cli import main

    path = write(tmp_path, "films_order.json", [films_run(), "oops"])
    out = tmp_path / "films.cwtrace"
    assert main(["import", "films", str(path), "-o", str(out)]) == 2 and not out.exists()
    capsys.readouterr()
    assert main(["import", "films", str(path), "-o", str(out), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "canvaswatch: import: skipped films_order.json: [1]: expected an object, got a string ('oops')"
    assert "wrote 1 traces" in captured.out and "skipped 1 malformed" in captured.out
    assert len(list(read_traces(out))) == 1
    write(tmp_path, "films_order.json", ["oops"])  # nothing valid: the reasons come before the refusal
    assert main(["import", "films", str(path), "-o", str(tmp_path / "none.cwtrace"), "--skip-invalid"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "canvaswatch: import: skipped films_order.json: [0]: expected an object, got a string ('oops')",
        "canvaswatch: import: films_order.json: (top level): no valid runs in the file"]


def _late_lock():
    run = films_run()
    run["lock"][0] = 8
    return [run]


@pytest.mark.parametrize("data, argv, message", [
    (_late_lock(), ["{capture}"], "films_order.json: [0].lock[0]: lock step 8 is beyond T"),
    ({"not": "a list"}, ["{capture}"], "films_order.json: (top level): expected a list"),
    ([films_run()], ["{absent}"], "absent.json: (file): cannot read"),
    ([films_run()], ["{capture}", "--k", "0"], "k must be an integer in [1, 1024]"),
    ([films_run()], ["{capture}", "--k", "100000"], "k must be an integer in [1, 1024]"),  # grew past 11 GB
    ([films_run()], ["{capture}", "--rule", "entropy", "--curves", "{absent}"], "absent.json: (file)"),
])
def test_import_command_refuses_bad_input_in_one_line_with_exit_2(tmp_path, capsys, data, argv, message):
    from canvaswatch.server.cli import main

    capture = write(tmp_path, "films_order.json", data)
    out = tmp_path / "out.cwtrace"
    argv = [a.format(capture=capture, absent=tmp_path / "absent.json") for a in argv]
    assert main(["import", "films", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("canvaswatch: import: " + message) and "\n" not in err, err
    assert not out.exists()


def test_import_command_names_the_formats(tmp_path, capsys):
    from canvaswatch.server.cli import main

    assert main(["import", "poems", str(tmp_path / "x.json"), "-o", str(tmp_path / "x.cwtrace")]) == 2
    assert capsys.readouterr().err.strip() == ("canvaswatch: import: unknown capture format 'poems'; "
                                               "one of gallery, clean, bench_order, films, poem")


def test_ranges_are_compact_and_read_back_by_eval():
    from canvaswatch.server.evaluation.evaluate import parse_positions

    assert ranges([12, 13, 14, 15, 20]) == "12-15,20" and ranges([]) == ""
    assert parse_ranges("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    positions = [0, 1, 2, 5, 7, 8, 30]
    assert parse_positions(ranges(positions)) == set(positions)


# ---------------------------------------------------------------- (b) the real captures

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real captures not present at {REAL} (see its README)")
COUNTS = {"gallery": 12, "clean": 180, "bench_order": 48, "films": 490, "poem": 12}


@needs_real
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_real_capture_imports_whole(fmt, vocab):
    path = REAL / FORMATS[fmt].file
    traces = import_capture(fmt, path, encoder=vocab)
    data = json.loads(path.read_text())
    assert len(traces) == len(data) == COUNTS[fmt]
    assert all(t.info.attributes["source"] == f"real:{FORMATS[fmt].file}" for t in traces)
    if fmt == "gallery":
        for trace, run in zip(traces, data):
            ids, _ = topk(trace)
            assert list(trace.steps[-1].output_ids) == run["frames"][-1]
            assert (ids[..., 0] == np.array(run["frames"])).all()
    if fmt == "clean":
        revised = {name for name, run in data.items() if len(run["answer_traj"]) > 1}
        labelled = {t.info.attributes["name"] for t in traces if "self_correction" in t.info.attributes["labels"]}
        assert labelled == revised
        for trace, run in zip(traces, data.values()):
            assert list(trace.steps[-1].output_ids) == run["final_ids"]


@needs_real
def test_real_text_tokenises_back_to_the_captured_ids(vocab):
    # The rule that puts bench/poem text on positions: clean.json's text gives exactly its ids,
    # every poem's text exactly its content length.
    for name, run in json.loads((REAL / "clean.json").read_text()).items():
        ids = encode_text(vocab, run["final_text"])
        assert ids == run["final_ids"][: len(ids)], name
    for run in json.loads((REAL / "poem_order.json").read_text()):
        assert len(encode_text(vocab, run["final_text"])) == len(run["content"]), run["pid"]


@needs_real
@pytest.mark.parametrize("fmt", ["gallery", "poem"])
def test_real_captures_under_the_entropy_rule(fmt, vocab):
    traces = import_capture(fmt, REAL / FORMATS[fmt].file, rule="entropy", encoder=vocab)
    for trace in traces:
        _, probs = topk(trace)
        assert (probs.sum(-1) <= 1 + 1e-6).all() and (np.diff(probs, axis=-1) <= 1e-7).all()
        assert trace.info.attributes["rule"] == "entropy"


@needs_real
def test_check_runs_on_imported_real_traces(vocab, tmp_path, capsys):
    from canvaswatch.server.cli import main

    out = tmp_path / "real.cwtrace"
    traces = import_capture("gallery", REAL / "gallery.json")[:2] + import_capture("poem", REAL / "poem_order.json",
                                                                                    encoder=vocab)[:1]
    assert write_traces(out, traces) == 3 and len(list(read_traces(out))) == 3
    assert main(["check", str(out), "--json"]) == 0
    verdicts = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [v["request_id"] for v in verdicts] == [t.info.request_id for t in traces]
