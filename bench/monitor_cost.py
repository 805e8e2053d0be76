"""Per-step cost of decoding and of each default monitor, per traffic profile, at L in {256, 1024}, k = 8.

    python bench/monitor_cost.py [--lengths 256,1024] [--steps 200] [--profiles default,hot,high_entropy]

Steps are SIMULATED requests on the simulator's calibrated profiles (bench/traffic.py:
the bundled texts tiled over the canvas, consecutive blocks of each profile's own
step count; `synthetic` is the generator of the figures before issue 12); each
monitor then runs over freshly decoded steps in a new request (so the canvas
text each builds is inside its timing; in the server, monitors share it).
Prints one table per profile: microseconds per step (mean over the steps, best
of 3 passes, process CPU time unless `--clock wall`), and the default set as the server runs it: all monitors on each
step, sharing what they share (the canvas text, the phrase matcher pass).
`--extras` adds the two monitors that need a file (below) to every table. The CPU
clock counts every thread of the process: right for the default set (one thread),
not for the probe's torch matmul, whose intra-op threads spin while they wait for a
core on a busy machine (use `--clock wall` for the extras there).

Also the two monitors that need a file: `probe` (8 random linear probes over
d = 640 hidden states sent with each step) and `classifier` (a BERT-sized-down
model built from a config with random weights, every 4th step; its step cost
is the hand-off to its thread, the model's own time is reported separately as
texts classified per second in batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))

from traffic import PROFILE_NAMES, profile_steps  # noqa: E402

from canvaswatch.monitors.base import RequestMeta  # noqa: E402
from canvaswatch.server.config import default_config  # noqa: E402
from canvaswatch.server.bottleneck.dense import DenseDecoder  # noqa: E402
from canvaswatch.server.pipeline.engine import Engine  # noqa: E402
from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402


# The process's CPU time by default: on a shared machine, time spent waiting for a core is not the
# monitors' cost (the per-step path runs on one thread); wall time with --clock wall.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class Timer:
    passes: int = 3
    clock: Callable[[], float] = time.process_time

    def best_of(self, fn, setup=lambda: None) -> float:
        """The shortest of `passes` runs of fn(setup()), setup outside the timing."""
        best = float("inf")
        for _ in range(self.passes):
            prepared = setup()
            start = self.clock()
            fn(prepared)
            best = min(best, self.clock() - start)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profiles", default=",".join(PROFILE_NAMES),
                        help="comma-separated: default, hot, high_entropy (calibrated), synthetic (pre-issue-12)")
    parser.add_argument("--extras", action="store_true", help="also time the probe and the classifier hand-off")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time (default; robust on a shared machine), wall: elapsed time")
    parser.add_argument("--passes", type=int, default=3, help="passes per row; the best is reported")
    args = parser.parse_args()
    timer = Timer(args.passes, CLOCKS[args.clock])
    vocab = load_vocabulary()
    engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
    lengths = [int(x) for x in args.lengths.split(",")]
    for profile in args.profiles.split(","):
        table(engine, vocab, profile, lengths, args.steps, args.extras, timer)


def table(engine: Engine, vocab, profile: str, lengths: list[int], steps: int, extras: bool, timer: Timer) -> None:
    """One profile's table: decode, each monitor alone, the default set together (us per step)."""
    rows: dict[str, list[float]] = {}
    pipelines: list[float] = []
    traffic = {length: profile_steps(profile, length, steps, vocab) for length in lengths}
    for length in lengths:
        messages = traffic[length]
        rows.setdefault("decode (topk form)", []).append(
            timer.best_of(lambda _: [engine.decoder.decode(m, length, "bench") for m in messages]) / len(messages))
        meta = RequestMeta("bench", "bench", "", (), length, steps)

        def fresh() -> list:
            # new DecodedSteps each pass: their cached text and views are computed inside the timing
            return decode_all(engine, messages, length)

        for monitor in engine.monitors:
            def run(decoded, monitor=monitor):
                state = monitor.start(meta)
                for step in decoded:
                    monitor.on_step(state, step)
            rows.setdefault(monitor.name, []).append(timer.best_of(run, fresh) / len(messages))

        def pipeline(decoded):
            # What the server does per step: every default monitor on the same step, so passes
            # that monitors share (the phrase matcher, the canvas text) are paid once.
            states = [(monitor, monitor.start(meta)) for monitor in engine.monitors]
            for step in decoded:
                for monitor, state in states:
                    monitor.on_step(state, step)
        pipelines.append(timer.best_of(pipeline, fresh) / len(messages))
    if extras:
        extra_rows(rows, lengths, traffic, engine, timer)
    print(f"\n# profile {profile}: per-step cost, k=8, {steps} SIMULATED steps, best of {timer.passes}, "
          f"{'CPU' if timer.clock is time.process_time else 'wall'} microseconds", flush=True)
    print("| stage | " + " | ".join(f"L={length}" for length in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, costs in rows.items():
        print(f"| {name} | " + " | ".join(f"{c * 1e6:.0f}" for c in costs) + " |")
    totals = [sum(costs[i] for costs in rows.values()) for i in range(len(lengths))]
    print("| **total** | " + " | ".join(f"{t * 1e6:.0f}" for t in totals) + " |")
    print("| **decode + default set as the server runs it** | "
          + " | ".join(f"{(rows['decode (topk form)'][i] + p) * 1e6:.0f}" for i, p in enumerate(pipelines)) + " |",
          flush=True)


def decode_all(engine: Engine, messages: list, length: int) -> list:
    """Decoded steps as the server hands them to monitors: new_block set on each block's first step."""
    decoded, block = [], None
    for message in messages:
        step = engine.decoder.decode(message, length, "bench")
        if step.block != block:
            step, block = dataclasses.replace(step, new_block=True), step.block
        decoded.append(step)
    return decoded


def extra_rows(rows: dict[str, list[float]], lengths: list[int], traffic: dict[int, list], engine: Engine,
               timer: Timer) -> None:
    import tempfile

    import torch
    from safetensors.torch import save_file

    from canvaswatch.monitors.classifier import ClassifierMonitor, ClassifierParams
    from canvaswatch.monitors.probe import ProbeMonitor, ProbeParams

    directory = Path(tempfile.mkdtemp(prefix="cw-bench-"))
    save_file({f"p{i}.{part}": value for i in range(8) for part, value in
               (("direction", torch.randn(640)), ("bias", torch.tensor(-50.0)), ("threshold", torch.tensor(0.99)))},
              str(directory / "probes.safetensors"))
    probe = ProbeMonitor(ProbeParams(path=str(directory / "probes.safetensors")))
    classifier = ClassifierMonitor(ClassifierParams(model=_tiny_classifier(directory / "classifier"), every_n_steps=4))
    for length in lengths:
        messages = traffic[length]
        meta = RequestMeta("bench", "bench", "", (), length, len(messages))
        hidden = torch.randn(length, 640)

        def fresh() -> list:
            return [dataclasses.replace(step, hidden=hidden) for step in decode_all(engine, messages, length)]

        for name, monitor in (("probe (8 labels, d=640)", probe), ("classifier (hand-off, every 4th step)", classifier)):
            def run(decoded, monitor=monitor):
                state = monitor.start(meta)
                for step in decoded:
                    monitor.on_step(state, step)
            rows.setdefault(name, []).append(timer.best_of(run, fresh) / len(messages))
    classifier.close()


def _tiny_classifier(directory: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    config = BertConfig(vocab_size=2, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(directory)
    return str(directory)


if __name__ == "__main__":
    main()
