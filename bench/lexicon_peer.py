"""A realistic lexicon against a peer: canvaswatch's lexicon vs protectai's llm-guard 0.3.16, same texts, same patterns (issue 12).

    python bench/lexicon_peer.py [--sizes 10,100,1000,10000] [--texts 2000] [--repeats 3]
                                 [--wire-size 1000] [--peer-seconds 20] [--no-peer] [--before REV]

Texts: `--texts` REAL English texts of `--tokens` (330) Gemma tokens each, cut
from prose that ships with this machine's Python, nothing downloaded: the
stdlib's `pydoc_data.topics` (the language reference and library topics that
`help()` shows), the license texts in /usr/share/common-licenses where there
is such a folder, then the docstrings (>= 80 characters) of the stdlib's own
modules, classes and functions in file order. The stream is tokenised with the
default Gemma vocabulary and cut into windows of exactly `--tokens` tokens;
each text is its window decoded, so both sides read the same characters.

Patterns: N phrases of 2-4 common words (N = each of `--sizes`; each list is
a prefix of the next), 10 of them PRESENT: word n-grams of the corpus's 300
most frequent words found in 1-5% of the texts; the other N - 10 ABSENT: random
2-4-word combinations of those words checked not to occur in the corpus even
as a case-folded substring (so no word-boundary rule can find them); plus
5 regexes (AWS key, e-mail, card number, SSN, URL), the same for both sides.

The peer: llm-guard's `BanSubstrings(phrases, match_type="word",
case_sensitive=False, redact=False)` then `Regex(regexes,
match_type="search", redact=False)` (the settings that cost it least) on each
text, its logging at ERROR, in its own venv outside the checkout (built on
first use at ~/.cache/canvaswatch/llm-guard-venv, `--peer-python` for
another): llm-guard is never a canvaswatch dependency. It is installed with
`pip install --no-deps llm-guard==0.3.16` plus the two packages these two
scanners import (structlog; presidio-anonymizer, whose TextReplaceBuilder
Regex uses, itself --no-deps), and the two scanner modules are imported
without running `llm_guard/input_scanners/__init__.py`, which imports every
scanner and so torch, transformers, spaCy and presidio-analyzer (the full
install pulls ~4 GB including CUDA wheels; these two scanners use none of
it). Timed: its texts/s over the texts it gets through in `--peer-seconds`
(at 1,000+ phrases it scans a few texts a second; at least 50 texts).

canvaswatch: `LexiconMonitor` in-process, each text one request of one step
(k = 1, the text's Gemma tokens as the top-1 canvas with probability 1), that
step also the last: start, on_step, the final text decoded from the ids (as the
server does), on_finish. Timed: canvases/s over all texts, best of
`--repeats`, peer and canvaswatch alternating per size. Through the wire
(`--wire-size`): a real sidecar (`canvaswatch serve`, lexicon only) on
127.0.0.1, each text one Watch stream of one top-k step and the final message,
1 and 4 streams at once, with a bare gRPC echo of the same messages in the
same run as the transport's own ceiling.

`--before REV` also times REV's three lexicon modules on the first
`--before-texts` texts (the old output check searched one regex per phrase: at
1,000+ phrases it takes seconds a text), alternating with this tree's.

Same flags: per text, the set of patterns each side flags. The peer's
verdicts per pattern come from its own match function (llm-guard's
`MatchType.WORD.match` on the lower-cased text, `re.search` for the regexes)
over every text, and are checked against the timed scanners' verdicts on the
texts those scanned; the absent phrases are absent by construction (not even a
substring). Every disagreement is printed with the text's context.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REGEXES: tuple[str, ...] = (
    r"AKIA[0-9A-Z]{16}(?![0-9A-Z])",  # AWS access key id
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",  # e-mail
    r"\b(?:\d{4}[ -]?){3}\d{4}\b",  # card number
    r"\b\d{3}-\d{2}-\d{4}\b",  # US SSN
    r"https?://[^\s<>\"']+",  # URL
)
PRESENT = 10
COMMON_WORDS = 300
PEER_VERSION = "0.3.16"
PEER_VENV = Path.home() / ".cache" / "canvaswatch" / "llm-guard-venv"
# What BanSubstrings and Regex import besides llm-guard and presidio-anonymizer (both installed --no-deps).
PEER_PACKAGES = ("structlog", "cryptography<44.1")


# ----------------------------------------------------------------------------------------------
# The peer's side: runs under the llm-guard venv's interpreter (`--peer-worker`), stdlib + llm-guard only.


def peer_worker(job_path: str) -> None:
    """Time llm-guard's two scanners on the job's texts; write rates and verdicts as JSON on stdout."""
    import importlib.util
    import types

    job = json.loads(Path(job_path).read_text())
    modules = {}
    if job["full_import"]:  # a full install: the package as its users import it
        from llm_guard.input_scanners import ban_substrings, regex as regex_module

        modules = {"ban_substrings": ban_substrings, "regex": regex_module}
        from llm_guard import util
    else:
        # The package's own __init__ files import every scanner (torch, transformers, spaCy): stand in
        # for them with bare packages and load util and the two scanner modules from llm-guard's files.
        root = Path(importlib.util.find_spec("llm_guard").submodule_search_locations[0])
        for name, folder in (("llm_guard", root), ("llm_guard.input_scanners", root / "input_scanners")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        import llm_guard.util as util

        for name in ("base", "ban_substrings", "regex"):
            spec = importlib.util.spec_from_file_location(f"llm_guard.input_scanners.{name}",
                                                          root / "input_scanners" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            modules[name] = module
    util.configure_logger(log_level="ERROR")
    ban = modules["ban_substrings"].BanSubstrings(job["phrases"], match_type="word", case_sensitive=False, redact=False)
    regex = modules["regex"].Regex(job["regexes"], match_type="search", redact=False)
    texts = job["texts"]
    verdicts = []
    start = time.perf_counter()
    for text in texts:
        _, ban_valid, _ = ban.scan(text)
        _, regex_valid, _ = regex.scan(text)
        verdicts.append([not ban_valid, not regex_valid])
        if time.perf_counter() - start >= job["seconds"] and len(verdicts) >= job["min_texts"]:
            break
    elapsed = time.perf_counter() - start
    # Per pattern, with the scanners' own rules, on every text (only the patterns the job asks about).
    word = modules["ban_substrings"].MatchType.WORD
    compiled = [re.compile(expression) for expression in job["regexes"]]
    per_text = []
    for text in job["check_texts"]:
        lowered = text.lower()
        hits = [p for p in job["check_phrases"] if word.match(lowered, p.lower())]
        hits += [expression for expression, c in zip(job["regexes"], compiled) if c.search(text)]
        per_text.append(hits)
    print(json.dumps({"texts": len(verdicts), "seconds": elapsed, "verdicts": verdicts, "per_text": per_text,
                      "python": sys.version.split()[0]}))


# ----------------------------------------------------------------------------------------------
# Corpus and patterns.


def prose_documents() -> list[tuple[str, str]]:
    """(source, text) of the English prose this machine's Python ships, in a fixed order."""
    import ast

    from pydoc_data.topics import topics

    documents = [("pydoc_data.topics", topics[name]) for name in sorted(topics)]
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        seen: set[Path] = set()
        for path in sorted(licenses.iterdir()):
            real = path.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                documents.append((f"common-licenses/{path.name}", real.read_text(errors="replace")))
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "site-packages":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    documents.append(("stdlib docstrings", doc))
    return documents


def corpus(vocab, count: int, tokens: int) -> tuple[list[str], list[list[int]], Counter]:
    """`count` texts of exactly `tokens` Gemma tokens, their ids, and how many came from each source."""
    texts: list[str] = []
    ids: list[list[int]] = []
    sources: Counter = Counter()
    pending: list[int] = []
    for source, document in prose_documents():
        pending += vocab.encode(document.strip() + "\n\n")
        while len(pending) >= tokens and len(texts) < count:
            window, pending = pending[:tokens], pending[tokens:]
            ids.append(window)
            texts.append(vocab.decode(window))
            sources[source.split("/")[0]] += 1
        if len(texts) == count:
            return texts, ids, sources
    raise SystemExit(f"--texts: only {len(texts)} texts of {tokens} tokens in this machine's prose, {count} asked")


_WORD = re.compile(r"[a-z]+")


def lexicon(texts: list[str], size: int, seed: int = 12) -> list[str]:
    """10 present phrases of 2-4 common words, then absent ones: the first `size` of one fixed list."""
    import ahocorasick

    lowered = [t.lower() for t in texts]
    frequency = Counter(w for t in lowered for w in _WORD.findall(t))
    common = [w for w, _ in frequency.most_common(COMMON_WORDS) if len(w) > 1 or w == "a"]
    common_set = set(common)
    document_frequency: Counter = Counter()
    for text in lowered:
        found = set()
        words = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]
        for i in range(len(words)):
            for n in (2, 3, 4):
                run = words[i : i + n]
                if len(run) < n or any(w not in common_set for w, _, _ in run):
                    continue
                if all(text[a[2] : b[1]] == " " for a, b in zip(run, run[1:])):
                    found.add(" ".join(w for w, _, _ in run))
        document_frequency.update(found)
    rng = random.Random(seed)
    low, high = 0.01 * len(texts), 0.05 * len(texts)
    present: list[str] = []
    for n, wanted in ((2, 4), (3, 4), (4, 2)):
        pool = sorted(p for p, c in document_frequency.items() if low <= c <= high and p.count(" ") == n - 1)
        present += rng.sample(pool, min(wanted, len(pool)))
    automaton = ahocorasick.Automaton()
    haystack = "\x00".join(lowered)
    absent: list[str] = []
    chosen = set(present)
    while len(present) + len(absent) < size:
        batch = []
        while len(batch) < 2 * (size - len(present) - len(absent)) + 16:
            phrase = " ".join(rng.choice(common) for _ in range(rng.choice((2, 3, 4))))
            if phrase not in chosen:
                chosen.add(phrase)
                batch.append(phrase)
        automaton = ahocorasick.Automaton()
        for phrase in batch:
            automaton.add_word(phrase, phrase)
        automaton.make_automaton()
        occurring = {phrase for _, phrase in automaton.iter(haystack)}
        absent += [p for p in batch if p not in occurring][: size - len(present) - len(absent)]
    return (present + absent)[:size]


# ----------------------------------------------------------------------------------------------
# canvaswatch's side.


def canvaswatch_run(vocab, phrases: list[str], texts: list[str], ids: list[list[int]], repeats: int,
                    measure: bool = True) -> tuple[float, float, list[set[str]]]:
    """(canvases/s best of `repeats`, build seconds, flagged patterns per text) of the lexicon in-process."""
    import numpy as np

    from canvaswatch.monitors.base import DecodedStep, FinalCanvas, RequestMeta
    from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams

    started = time.perf_counter()
    monitor = LexiconMonitor(LexiconParams(patterns=list(phrases), regex=list(REGEXES)))
    arrays = [np.asarray(window, dtype=np.int64).reshape(-1, 1) for window in ids]
    ones = [np.ones((len(window), 1), dtype=np.float32) for window in ids]
    meta = RequestMeta("bench", "bench", "", (), len(ids[0]), 1)

    def one(index: int) -> list:
        state = monitor.start(meta)
        step = DecodedStep(block=0, step=0, ids=arrays[index], probs=ones[index], vocab=vocab, new_block=True)
        flags = monitor.on_step(state, step)
        final = FinalCanvas(tuple(ids[index]), vocab.decode(ids[index]), 1, 0)
        return flags + monitor.on_finish(state, final)

    flagged = [{flag.attributes["pattern"] for flag in one(i)} for i in range(len(ids))]  # builds tables, warms up
    build = time.perf_counter() - started
    best = float("inf")
    for _ in range(repeats if measure else 0):
        start = time.perf_counter()
        for i in range(len(ids)):
            one(i)
        best = min(best, time.perf_counter() - start)
    return len(ids) / best if measure else float("nan"), build, flagged


def wire_run(phrases: list[str], ids: list[list[int]], streams_list: tuple[int, ...], repeats: int,
             workdir: Path) -> tuple[dict[int, tuple[float, float]], list[set[str]]]:
    """Per stream count (sidecar canvases/s, echo canvases/s), medians; and the sidecar's flagged patterns per text."""
    import statistics

    import grpc

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import free_port, run_streams, wait_ready

    from canvaswatch.client.stream import channel_options
    from canvaswatch.client.tensors import encode_tensor
    from canvaswatch.v1 import monitor_pb2 as pb
    from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

    import torch

    config = workdir / "lexicon_only.toml"
    config.write_text("[dense]\nembeddings = \"\"\n\n[logging]\naudit_log = \"\"\nlevel = \"warning\"\n\n"
                      "[monitors.lexicon]\n" + f"patterns = {json.dumps(phrases)}\nregex = {json.dumps(list(REGEXES))}\n")
    messages = []
    for index, window in enumerate(ids):
        topk = pb.TopK(ids=encode_tensor(torch.tensor(window, dtype=torch.int32).reshape(-1, 1)),
                       probs=encode_tensor(torch.ones((len(window), 1), dtype=torch.float32)))
        first = pb.StepState(info=pb.RequestInfo(request_id=f"text-{index}", model="bench", canvas_length=len(window),
                                                 total_steps=1), block=0, step=0, topk=topk)
        messages.append((first, pb.StepState(final=True, output_ids=window)))
    port, echo_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sidecar = subprocess.Popen([sys.executable, "-m", "canvaswatch.server.cli", "serve", "--config", str(config),
                                "--grpc-port", str(port), "--metrics-port", "-1"], env=env, stderr=subprocess.DEVNULL)
    echo = subprocess.Popen([sys.executable, str(Path(__file__).parent / "throughput.py"), "--echo-port", str(echo_port)],
                            env=env)
    try:
        wait_ready(f"127.0.0.1:{port}", timeout=600)
        wait_ready(f"127.0.0.1:{echo_port}")

        def drive(target: str, streams: int, collect: list | None) -> float:
            channel = grpc.insecure_channel(target, options=channel_options())
            stub = pb_grpc.CanvasMonitorStub(channel)
            def worker(offset: int) -> None:
                for index in range(offset, len(messages), streams):
                    events = list(stub.Watch(iter(messages[index]), timeout=120))
                    if not events or not events[-1].HasField("verdict"):
                        raise RuntimeError(f"text {index}: no verdict")
                    if collect is not None:
                        collect[index] = {f.attributes["pattern"] for f in events[-1].verdict.flags}

            try:
                elapsed = run_streams(worker, streams)
            finally:
                channel.close()
            return len(messages) / elapsed

        flagged: list = [None] * len(messages)
        drive(f"127.0.0.1:{port}", 1, flagged)  # warm-up, and the flags
        drive(f"127.0.0.1:{echo_port}", 1, None)
        rates = {}
        for streams in streams_list:
            side, bare = [], []
            for _ in range(repeats):
                bare.append(drive(f"127.0.0.1:{echo_port}", streams, None))
                side.append(drive(f"127.0.0.1:{port}", streams, None))
            rates[streams] = (statistics.median(side), statistics.median(bare))
        return rates, flagged
    finally:
        for process in (sidecar, echo):
            process.terminate()
            process.wait(timeout=60)


def before_worker(job_path: str) -> None:
    """canvaswatch's side with the lexicon's modules of another revision (job["modules"]): rate as JSON."""
    import importlib.util

    import canvaswatch.monitors  # noqa: F401  (the package, before its three modules are replaced)

    job = json.loads(Path(job_path).read_text())
    for name in ("phrase_scan", "phrases", "lexicon"):
        spec = importlib.util.spec_from_file_location(f"canvaswatch.monitors.{name}", Path(job["modules"]) / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    rate, build, flagged = canvaswatch_run(load_vocabulary(), job["phrases"], job["texts"], job["ids"], job["repeats"])
    print(json.dumps({"rate": rate, "build": build, "flagged": [sorted(f) for f in flagged]}))


def before_run(revision: str, phrases: list[str], texts: list[str], ids: list[list[int]], repeats: int,
               workdir: Path) -> dict:
    """Rate and flags of `revision`'s monitors/{phrase_scan,phrases,lexicon}.py on the same texts (a subprocess)."""
    modules = workdir / f"before-{revision}"
    modules.mkdir(exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    for name in ("phrase_scan", "phrases", "lexicon"):
        source = subprocess.run(["git", "-C", str(root), "show", f"{revision}:monitors/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        (modules / f"{name}.py").write_text(source)
    job = workdir / "before_job.json"
    job.write_text(json.dumps({"modules": str(modules), "phrases": phrases, "texts": texts, "ids": ids,
                               "repeats": repeats}))
    out = subprocess.run([sys.executable, __file__, "--before-worker", str(job)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The peer's venv and runs, seen from canvaswatch's side.


def ensure_peer_venv(venv: Path) -> Path:
    """The llm-guard venv's python, built on first use (never inside the checkout)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; import presidio_anonymizer.core.text_replace_builder, "
             f"structlog; assert m.version('llm-guard') == '{PEER_VERSION}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"# building the peer's venv at {venv} (llm-guard {PEER_VERSION}, minimal)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["--no-deps", f"llm-guard=={PEER_VERSION}", "presidio-anonymizer==2.2.358"], check=True)
    subprocess.run(pip + list(PEER_PACKAGES), check=True)
    subprocess.run(probe, check=True)
    return python


def peer_run(python: Path, phrases: list[str], texts: list[str], present: list[str], seconds: float,
             workdir: Path, full_import: bool) -> dict:
    job = workdir / "peer_job.json"
    job.write_text(json.dumps({"phrases": phrases, "regexes": list(REGEXES), "texts": texts, "seconds": seconds,
                               "min_texts": 50, "check_texts": texts, "check_phrases": present,
                               "full_import": full_import}))
    out = subprocess.run([str(python), __file__, "--peer-worker", str(job)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(texts: list[str], peer: dict, ours: list[set[str]], label: str) -> list[str]:
    """Every text whose flagged patterns differ, with the context of each differing pattern."""
    lines = []
    for index, (theirs, mine) in enumerate(zip(peer["per_text"], ours)):
        if set(theirs) != mine:
            for pattern in sorted(set(theirs) ^ mine):
                side = "llm-guard only" if pattern in theirs else "canvaswatch only"
                where = _context(texts[index], pattern)
                lines.append(f"  {label} text {index}: {pattern!r} {side}: {where!r}")
    # The timed scanners' verdicts agree with the per-pattern ones on the texts they scanned.
    for index, (ban, regex) in enumerate(peer["verdicts"]):
        theirs = peer["per_text"][index]
        expected_ban = any(p not in REGEXES for p in theirs)
        expected_regex = any(p in REGEXES for p in theirs)
        if (ban, regex) != (expected_ban, expected_regex):
            lines.append(f"  {label} text {index}: llm-guard's scanners said ban={ban} regex={regex}, its per-pattern "
                         f"match said {theirs}")
    return lines


def _context(text: str, pattern: str) -> str:
    expression = re.compile(pattern) if pattern in REGEXES else re.compile(re.escape(pattern), re.IGNORECASE)
    found = expression.search(text)
    if found is None:
        return "(not in the text as written)"
    return text[max(0, found.start() - 30) : found.end() + 30]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=330)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-seconds", type=float, default=20.0, help="time budget of each peer run")
    parser.add_argument("--peer-python", help="an interpreter with llm-guard 0.3.16 (default: build the venv)")
    parser.add_argument("--peer-full-import", action="store_true",
                        help="import llm_guard.input_scanners as a package (needs the full install in --peer-python)")
    parser.add_argument("--no-peer", action="store_true", help="canvaswatch alone (no peer column)")
    parser.add_argument("--wire-size", type=int, default=1000, help="phrases for the sidecar run; 0 = no wire run")
    parser.add_argument("--wire-streams", default="1,4")
    parser.add_argument("--workdir", default="/tmp/canvaswatch-lexicon-peer")
    parser.add_argument("--before", help="also time this git revision's lexicon modules (monitors/phrase_scan.py, "
                        "phrases.py, lexicon.py) on the first --before-texts texts, alternating: a same-run before/after")
    parser.add_argument("--before-texts", type=int, default=100)
    parser.add_argument("--before-sizes", default="10,100,1000",
                        help="phrase counts of the before/after (the old code needs ~2.5 s a text at 10,000)")
    parser.add_argument("--peer-worker", help=argparse.SUPPRESS)
    parser.add_argument("--before-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        peer_worker(args.peer_worker)
        return
    if args.before_worker:
        before_worker(args.before_worker)
        return

    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = load_vocabulary()
    started = time.perf_counter()
    texts, ids, sources = corpus(vocab, args.texts, args.tokens)
    sizes = [int(x) for x in args.sizes.split(",")]
    phrases = lexicon(texts, max(sizes + [args.wire_size]))
    present = phrases[:PRESENT]
    python = None if args.no_peer else (Path(args.peer_python) if args.peer_python else ensure_peer_venv(PEER_VENV))
    print(f"# {len(texts)} REAL English texts of {args.tokens} Gemma tokens ({sum(map(len, texts)) / len(texts):.0f} "
          f"characters on average) from {dict(sources)}, made in {time.perf_counter() - started:.0f} s; "
          f"{os.cpu_count()} cores; Python {sys.version.split()[0]}")
    print(f"# present phrases: {present}")
    print(f"# regexes: {list(REGEXES)}")
    print(f"# canvaswatch: lexicon in-process, k=1, one canvas per request, best of {args.repeats}; llm-guard "
          f"{PEER_VERSION}: BanSubstrings(word, case-insensitive) + Regex(search), up to {args.peer_seconds:.0f} s a run")
    print("| phrases + regexes | llm-guard texts/s | canvaswatch canvases/s | ratio | canvaswatch build s | "
          "texts flagged (either side) | disagreements |")
    print("|---|---|---|---|---|---|---|")
    problems: list[str] = []
    for size in sizes:
        subset = phrases[:size]
        peer_rates = []
        ours_rate, build, ours = canvaswatch_run(vocab, subset, texts, ids, args.repeats)
        peer = None
        if python is not None:  # alternate: peer, canvaswatch, peer
            for _ in range(2):
                peer = peer_run(python, subset, texts, present, args.peer_seconds, workdir, args.peer_full_import)
                peer_rates.append(peer["texts"] / peer["seconds"])
            ours_rate = max(ours_rate, canvaswatch_run(vocab, subset, texts, ids, args.repeats)[0])
        peer_rate = max(peer_rates) if peer_rates else float("nan")
        lines = compare(texts, peer, ours, f"N={size}") if peer else []
        problems += lines
        flagged = sum(1 for f in ours if f)
        print(f"| {size} + {len(REGEXES)} | {peer_rate:.1f} | {ours_rate:.0f} | {ours_rate / peer_rate:.1f}x | "
              f"{build:.1f} | {flagged} | {len(lines)} |", flush=True)
    if args.before:
        count = min(args.before_texts, len(texts))
        print(f"\n# before/after: {args.before}'s lexicon modules vs this tree's, the first {count} texts, best of "
              f"2 before, {args.repeats} after, alternating (before, after, before); flags compared text by text")
        print("| phrases + regexes | before canvases/s | after canvases/s | after / before | texts whose flags differ |")
        print("|---|---|---|---|---|")
        for size in (int(x) for x in args.before_sizes.split(",")):
            subset = phrases[:size]
            before = [before_run(args.before, subset, texts[:count], ids[:count], 1, workdir)]
            after_rate, _, after_flags = canvaswatch_run(vocab, subset, texts[:count], ids[:count], args.repeats)
            before.append(before_run(args.before, subset, texts[:count], ids[:count], 1, workdir))
            best = max(b["rate"] for b in before)
            differ = sum(1 for b, a in zip(before[0]["flagged"], after_flags) if set(b) != a)
            print(f"| {size} + {len(REGEXES)} | {best:.1f} | {after_rate:.0f} | {after_rate / best:.0f}x | {differ} |",
                  flush=True)
    if args.wire_size:
        subset = phrases[: args.wire_size]
        streams = tuple(int(x) for x in args.wire_streams.split(","))
        rates, wire_flags = wire_run(subset, ids, streams, args.repeats, workdir)
        _, _, ours = canvaswatch_run(vocab, subset, texts, ids, 1, measure=False)
        mismatched = sum(1 for a, b in zip(wire_flags, ours) if a != b)
        print(f"\n# through the wire: `canvaswatch serve` (lexicon only, {args.wire_size} phrases + {len(REGEXES)} regexes) "
              f"on 127.0.0.1, one Watch stream per text (one k=1 step + final), median of {args.repeats}; a bare gRPC "
              f"echo of the same messages alternating; flags vs in-process: {mismatched} texts differ")
        print("| streams | sidecar canvases/s | echo canvases/s | sidecar / echo |")
        print("|---|---|---|---|")
        for count, (side, bare) in rates.items():
            print(f"| {count} | {side:.0f} | {bare:.0f} | {side / bare:.2f} |", flush=True)
    if problems:
        print("\n# disagreements (pattern, which side flagged it, the text around it):")
        print("\n".join(problems))


if __name__ == "__main__":
    main()
