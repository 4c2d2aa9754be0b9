"""`openllama data dedup`: exact and near-duplicates across subsets, filters, decontamination, restart, CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import harness
from openllama import cli, files
from openllama.data import clean, dedup, filters, minhash, redpajama
from openllama.data.work import Progress
from openllama.eval import task_texts

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
OPENLLAMA = str(Path(sys.executable).parent / "openllama")
BOOLQ_PASSAGE = json.loads((task_texts.TASK_PACK / "data" / "boolq.jsonl").read_text().splitlines()[0])["passage"]


def sample_texts(name: str, n: int, size: int = 1500) -> list[str]:
    """n distinct documents of about `size` characters cut from a shipped sample file."""
    text = "\n".join(json.loads(line)["text"] for line in open(SAMPLE / name, encoding="utf-8"))
    return [text[i * size : (i + 1) * size] for i in range(n)]


def edit_words(text: str, every: int) -> str:
    """`text` with every `every`-th word replaced: a near-duplicate whose similarity falls as `every` does."""
    words = text.split(" ")
    return " ".join(f"zq{i}x" if i % every == every - 1 else w for i, w in enumerate(words))


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "meta": {"n": i}}) + "\n" for i, t in enumerate(texts)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """c4 (full layout) and wikipedia (sample layout) files with planted copies, a short and a contaminated doc.

    wiki[0] is in c4 again with its case and spacing changed (exact, across subsets); wiki[1] has a near copy in
    a second wikipedia file (fuzzy, across files and layouts); c4[2] has a far-edited version (kept); c4[3] is in
    c4 again three times (a cluster); one c4 document quotes a boolq passage.
    """
    root = tmp_path_factory.mktemp("corpus")
    c4, wiki = sample_texts("c4_sample.jsonl", 8), sample_texts("wikipedia_sample.jsonl", 6)
    planted = {
        "exact": "  ".join(wiki[0].upper().split(" ")),
        "near": edit_words(wiki[1], 100),
        "far": edit_words(c4[2], 3),
        "contaminated": c4[5][:600] + " " + BOOLQ_PASSAGE + " " + c4[6][:600],
    }
    write_jsonl(root / "rp/c4/c4-train.00000-of-01024.jsonl",
                [*c4[:5], planted["exact"], planted["far"], c4[3], "too short", planted["contaminated"]])
    write_jsonl(root / "rp/c4/c4-train.00001-of-01024.jsonl", [c4[7], c4[3], edit_words(c4[3], 80)])
    write_jsonl(root / "sample/wikipedia_sample.jsonl", wiki)
    write_jsonl(root / "rp/wikipedia/wiki.jsonl", [planted["near"]])
    return {"root": root, "inputs": [str(root / "rp"), str(root / "sample")], "c4": c4, "wiki": wiki, **planted}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """The local task pack's item texts, written by eval's own command as the pipeline writes them."""
    path = tmp_path_factory.mktemp("eval_texts") / "texts.json"
    assert cli.main(["eval", "texts", "openllama_local", "--out", str(path)]) == 0
    return path


def run(inputs: list[str], out: Path, texts: Path, on_progress: Progress | None = None, **settings) -> dict:
    options = {"track": False, "partitions": 4, "concurrency": 2, "decontaminate": str(texts), **settings}
    return clean.run_dedup(clean.DedupConfig(inputs=inputs, out=str(out), **options), on_progress)


@pytest.fixture(scope="module")
def result(corpus, texts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dedup")
    return out, run(corpus["inputs"], out, texts)


def kept_texts(out: Path) -> dict[str, list[str]]:
    """The output corpus read back as `data tokenize` reads it: {subset: texts}."""
    texts: dict[str, list[str]] = {}
    for path in redpajama.expand_inputs([str(out)]):
        texts.setdefault(redpajama.subset_of(path), []).extend(
            r.text for r in redpajama.read_records(path) if isinstance(r, redpajama.Document))
    return texts


def duplicates(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "duplicates").to_pylist(), key=lambda r: r["id"])


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every published file but the timing in stats.json and the manifest that holds it."""
    found = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {k: v for k, v in found.items() if k not in ("stats.json", "dedup.json")}


def test_the_output_is_a_redpajama_corpus_with_the_subsets_of_its_inputs(corpus, result):
    out, _ = result
    assert sorted(kept_texts(out)) == ["c4", "wikipedia"]
    assert {p.rsplit("/", 1)[-1] for p in redpajama.expand_inputs([str(out)])} == {
        "c4-train.00000-of-01024.jsonl", "c4-train.00001-of-01024.jsonl", "wikipedia_sample.jsonl", "wiki.jsonl"}


def test_exact_copies_across_subsets_keep_the_first_by_subset_file_and_line(corpus, result):
    out, _ = result
    [row] = [r for r in duplicates(out) if r["stage"] == "exact" and r["subset"] == "wikipedia"]
    assert row["source"].endswith("wikipedia_sample.jsonl") and row["line"] == 1
    assert row["kept_source"].endswith("c4-train.00000-of-01024.jsonl") and row["kept_line"] == 6
    assert row["kept_id"] == "c4/c4-train.00000-of-01024.jsonl:6"
    assert corpus["exact"] in kept_texts(out)["c4"] and corpus["wiki"][0] not in kept_texts(out)["wikipedia"]


def test_a_near_copy_in_another_file_is_removed_as_fuzzy(corpus, result):
    out, _ = result
    [row] = [r for r in duplicates(out) if r["stage"] == "fuzzy" and r["subset"] == "wikipedia"]
    assert row["source"].endswith("wikipedia_sample.jsonl") and row["line"] == 2
    assert row["kept_source"].endswith("rp/wikipedia/wiki.jsonl") and row["kept_line"] == 1  # rp/ sorts first
    assert corpus["near"] in kept_texts(out)["wikipedia"] and corpus["wiki"][1] not in kept_texts(out)["wikipedia"]


def test_a_cluster_keeps_one_document_and_a_far_edit_is_kept(corpus, result):
    out, _ = result
    cluster = [r for r in duplicates(out) if r["kept_id"] == "c4/c4-train.00000-of-01024.jsonl:4"]
    assert sorted((r["source"].rsplit("/", 1)[-1], r["line"], r["stage"]) for r in cluster) == [
        ("c4-train.00000-of-01024.jsonl", 8, "exact"), ("c4-train.00001-of-01024.jsonl", 2, "exact"),
        ("c4-train.00001-of-01024.jsonl", 3, "fuzzy")]
    assert corpus["far"] in kept_texts(out)["c4"] and corpus["c4"][2] in kept_texts(out)["c4"]


def test_counts_per_subset_add_up(corpus, result):
    stats = result[1]["stats"]
    assert stats["subsets"]["c4"] | {"rejected": None} == {
        "files": 2, "documents": 13, "kept": 8, "kept_bytes": stats["subsets"]["c4"]["kept_bytes"], "exact": 2,
        "fuzzy": 1, "rejected": None}
    assert stats["subsets"]["c4"]["rejected"] == {"short": 1, "contaminated": 1}
    assert stats["subsets"]["wikipedia"] | {"kept_bytes": 0} == {
        "files": 2, "documents": 7, "kept": 5, "kept_bytes": 0, "exact": 1, "fuzzy": 1, "rejected": {}}


def test_a_document_quoting_an_eval_item_is_rejected_and_counted_per_task(corpus, result):
    out, manifest = result
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {(r["reason"], r["line"], r["detail"]) for r in rejected} == {("short", 9, ""),
                                                                        ("contaminated", 10, "local_boolq")}
    tasks = manifest["stats"]["decontamination"]
    assert tasks["local_boolq"]["documents_removed"] == 1 and tasks["local_arc"]["documents_removed"] == 0
    assert tasks["local_arithmetic"] == {"items": 12, "unchecked_items": 12, "documents_removed": 0}


def test_the_result_does_not_depend_on_input_order_partitions_or_concurrency(corpus, texts, result, tmp_path):
    reordered = [str(corpus["root"] / "sample/wikipedia_sample.jsonl"), str(corpus["root"] / "rp/wikipedia"),
                 str(corpus["root"] / "rp/c4")]
    run(reordered, tmp_path, texts, partitions=1, concurrency=1)
    assert output_bytes(tmp_path) == output_bytes(result[0])


STAGES = ["scan", "match", "pair", "verify", "components", "resolve", "write"]


@pytest.mark.parametrize("stopped", STAGES[1:])
def test_a_run_killed_midway_resumes_with_nothing_lost_or_doubled(stopped, corpus, texts, result, tmp_path):
    def stop_midway(stage: str, finished: int, to_run: int) -> None:
        if stage == f"dedup {stopped}" and finished == 2:
            raise RuntimeError(f"stopping after {finished} of {to_run} {stage} tasks, as if the run had crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        run(corpus["inputs"], tmp_path, texts, on_progress=stop_midway)
    assert json.loads((tmp_path / "dedup.json").read_text())["finished"] is False
    resumed: list[tuple[str, int]] = []
    manifest = run(corpus["inputs"], tmp_path, texts,
                   on_progress=lambda stage, n, total: resumed.append((stage.removeprefix("dedup "), total)))
    assert not {stage for stage, _ in resumed} & set(STAGES[:STAGES.index(stopped)])  # finished work not redone
    assert output_bytes(tmp_path) == output_bytes(result[0])
    assert manifest["stats"]["total"] == result[1]["stats"]["total"]


def test_a_bucket_to_bucket_run_killed_midway_equals_the_local_run(corpus, texts, result, s3_server, bucket):
    """Inputs and OUT on the S3-protocol test server, through the command line: every stage's files go through
    the bucket (nothing is memory-mapped or listed locally), and a run SIGKILLed in the verify stage finishes
    when the same command runs again."""
    root = corpus["root"]
    for path in sorted(root.rglob("*.jsonl")):
        files.copy_file(path, f"{bucket}/in/{path.relative_to(root)}")
    files.copy_file(texts, f"{bucket}/texts.json")
    out = f"{bucket}/dedup"
    command = [OPENLLAMA, "data", "dedup", f"{bucket}/in/rp", f"{bucket}/in/sample", "--out", out,
               "--partitions", "4", "--concurrency", "1", "--no-track", "--decontaminate", f"{bucket}/texts.json"]
    env = harness.clean_env(**s3_server.env)
    proc = harness.start(command, env, cwd=REPO)
    try:
        harness.wait_for(lambda: files.is_file(f"{out}/work/verify/00000.json"), 240, "the first verify task", proc,
                         poll=0.05)
    finally:
        harness.kill_group(proc)
    assert not files.read_json(f"{out}/dedup.json")["finished"]
    rerun = harness.run(command, env, timeout=300, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert files.read_json(f"{out}/dedup.json")["stats"]["total"] == result[1]["stats"]["total"]
    published = {p.removeprefix(f"{out}/"): files.read_bytes(p) for p in files.files_under(out)}
    local = output_bytes(result[0])
    corpus_files = sorted(k for k in local if k.endswith(".jsonl"))
    assert corpus_files and {k: published[k] for k in corpus_files} == {k: local[k] for k in corpus_files}
    assert not any(k.startswith("work/") for k in published)  # the run's scratch is removed when it finishes

    def rows(table: pa.Table, prefix: str) -> list[dict]:
        found = [{k: v.removeprefix(prefix) if isinstance(v, str) else v for k, v in r.items()} for r in
                 table.to_pylist()]
        return sorted(found, key=lambda r: r["id"])

    remote = pa.concat_tables([pq.read_table(pa.BufferReader(v)) for k, v in published.items()
                               if k.startswith("duplicates/")])
    assert rows(remote, f"{bucket}/in/") == rows(pq.read_table(result[0] / "duplicates"), f"{root}/")


def test_a_finished_run_is_reused_and_other_settings_are_refused(corpus, texts, result):
    assert run(corpus["inputs"], result[0], texts) == result[1]
    with pytest.raises(ValueError, match="threshold"):
        run(corpus["inputs"], result[0], texts, threshold=0.9)


@pytest.mark.parametrize("name, text", [
    ("gopher_word_count", "word " * 40),
    ("gopher_mean_word_length", "a b c de " * 20 + "the and"),
    ("gopher_symbol_ratio", "the and # tag " * 20),
    ("gopher_bullet_lines", "\n".join(f"- the and item number {i} of the list" for i in range(20))),
    ("gopher_ellipsis_lines", "\n".join(f"the and then line {i} went on..." for i in range(20))),
    ("gopher_alpha_words", "the and " + "12 34 56 78 90 " * 20),
    ("gopher_stop_words", "quick brown foxes jump over lazy dogs " * 10),
    ("gopher_duplicate_lines", "\n".join(["the and same line here again"] * 10 + [f"the and {i}" for i in range(5)])),
    ("gopher_top_ngram", " ".join(["the cat"] * 40) + " with and of to " + " ".join(f"w{i}" for i in range(30))),
    ("c4_lorem_ipsum", "Lorem ipsum dolor sit amet, the and"),
    ("c4_curly_brace", "function the and() { return 1 }"),
])
def test_each_quality_filter_rejects_with_its_own_reason(name, text):
    assert filters.quality_reason(text, [name]) == name
    good = " ".join(json.loads(open(SAMPLE / "wikipedia_sample.jsonl").readline())["text"].split()[:300])
    assert filters.quality_reason(good, filters.expand(["gopher", "c4"])) is None


def test_the_short_filter_is_the_only_one_on_by_default():
    rules = filters.expand(clean.DedupConfig([], "x").filters)
    assert rules == ["short"]
    assert filters.quality_reason("x" * 199, rules) == "short"
    assert filters.quality_reason("x" * 200, rules) is None


def test_exact_normalization_is_nfc_whitespace_and_case_folding():
    assert dedup.exact_key("Caf\u00e9  STRASSE\n") == dedup.exact_key("cafe\u0301 straße")
    assert dedup.exact_key("a b") != dedup.exact_key("ab")


def test_every_local_task_gives_items_to_decontaminate_against(texts):
    items = json.loads(texts.read_text())
    assert set(items) == set(task_texts.LOCAL_TASK_FIELDS) and items == task_texts.task_texts(["openllama_local"])
    assert items["local_boolq"][0].startswith(BOOLQ_PASSAGE)
    assert all(len(texts) >= 10 for texts in items.values())


def test_the_default_preset_meets_its_targets_and_slimpajama_is_available():
    table = {row["jaccard"]: row for row in minhash.s_curve_table(minhash.PRESETS["default"], 0.8)}
    assert table[0.85]["p_removed"] >= 0.95 and table[0.7]["p_removed"] <= 0.01
    assert minhash.PRESETS["slimpajama"] == minhash.LshPreset(num_perm=128, bands=9, rows=13)


def test_estimated_jaccard_tracks_the_true_jaccard_of_13_grams():
    text = minhash.fuzzy_normalize(sample_texts("wikipedia_sample.jsonl", 1, 4000)[0])
    other = minhash.fuzzy_normalize(edit_words(sample_texts("wikipedia_sample.jsonl", 1, 4000)[0], 12))
    grams = [{t[i : i + 13] for i in range(len(t) - 12)} for t in (text, other)]
    true = len(grams[0] & grams[1]) / len(grams[0] | grams[1])
    a, b = minhash.permutations(250, 0)
    estimate = minhash.estimated_jaccard(*(minhash.signature(minhash.ngram_hashes(t), a, b) for t in (text, other)))
    assert abs(float(estimate) - true) < 0.08


def star_components(edges: np.ndarray, work: Path, partitions: int) -> tuple[dict[int, int], int, int]:
    """({node: label}, rounds, most arcs one task held) from the product's star rounds, run in-process in order
    (the Ray stages run the same functions, one task per partition)."""
    dedup.publish_edges(f"{work}/components/000", "edges", edges[:, 0], edges[:, 1], partitions)
    round_, largest = 0, 0
    while True:
        results = [dedup.star_round(round_, p, str(work), partitions) for p in range(partitions)]
        largest = max(largest, *(r["arcs"] for r in results))
        if round_ % 2 == 0 and all(r["star"] for r in results):
            break
        round_ += 1
    labels = {}
    for p in range(partitions):
        table = pq.read_table(work / "components" / f"{round_:03d}" / f"labels-{p:05d}.parquet")
        labels.update(zip(table["u"].to_pylist(), table["v"].to_pylist(), strict=True))
    return labels, round_ + 1, largest


def union_find_labels(edges: np.ndarray) -> dict[int, int]:
    """The smallest node of each node's connected component, by a plain union-find (the reference)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


def test_star_rounds_label_each_node_with_the_smallest_id_of_its_cluster(tmp_path):
    labels, _, _ = star_components(np.array([[5, 9], [9, 2], [7, 8], [2, 30]], dtype=np.int64), tmp_path, 3)
    assert labels == {2: 2, 5: 2, 9: 2, 30: 2, 7: 7, 8: 7}


@pytest.mark.parametrize("shape", ["path", "clique", "random"])
def test_star_rounds_equal_union_find_on_long_dense_and_random_graphs(shape, tmp_path):
    rng = np.random.default_rng(0)
    ids = (rng.integers(0, 50, 400) << dedup.ID_BITS) + rng.integers(0, 1 << 20, 400)  # ids as scan makes them
    if shape == "path":  # the worst case for label propagation: a chain through ids in random order
        edges = np.stack([ids[:-1], ids[1:]], axis=1)
    elif shape == "clique":
        i, j = np.triu_indices(30, k=1)
        edges = np.stack([ids[i], ids[j]], axis=1)
    else:
        edges = ids[rng.integers(0, len(ids), (300, 2))]
        edges = edges[edges[:, 0] != edges[:, 1]]
    labels, rounds, _ = star_components(edges, tmp_path, 4)
    assert labels == union_find_labels(edges)
    assert rounds <= 2 * int(np.log2(len(ids))) + 4


def test_a_star_round_task_holds_its_partition_of_the_graph_not_all_of_it(tmp_path):
    rng = np.random.default_rng(1)
    pairs = rng.choice(1 << 40, size=(3000, 2), replace=False)  # many small clusters, as in a real corpus
    _, _, whole = star_components(pairs, tmp_path / "one", 1)
    labels, _, largest = star_components(pairs, tmp_path / "eight", 8)
    assert labels == union_find_labels(pairs)
    assert largest <= whole / 4


def test_the_command_line_writes_the_corpus_and_logs_to_mlflow(corpus, texts, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = cli.main(["data", "dedup", *corpus["inputs"], "--out", str(tmp_path / "out"), "--partitions", "2",
                     "--preset", "default", "--decontaminate", str(texts)])
    assert code == 0 and "kept 13 of 20 documents" in capsys.readouterr().out
    client = MlflowClient(uri)
    [run_] = client.search_runs([client.get_experiment_by_name("data").experiment_id])
    assert run_.data.params["stage"] == "dedup" and run_.data.metrics["total_exact"] == 3
    assert run_.data.metrics["contaminated_local_boolq"] == 1


@pytest.mark.parametrize("argv, message", [
    (["/no/such/corpus", "--out", "OUT"], "does not exist"),
    (["CORPUS", "--out", "OUT", "--filter", "gopher_nonsense"], "unknown filter 'gopher_nonsense'"),
    (["CORPUS", "--out", "OUT", "--threshold", "1.5"], "threshold=1.5"),
    (["CORPUS", "--out", "OUT", "--decontaminate", "/no/such/texts.json"], "openllama eval texts"),
    (["CORPUS"], "missing required field out"),
])
def test_bad_input_exits_2_with_one_line(corpus, tmp_path, capsys, argv, message):
    argv = [a.replace("CORPUS", corpus["inputs"][0]).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(["data", "dedup", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("openllama data dedup: ")


# --- recall per Jaccard bin (the bin the goal is about, and the pairs dedup must keep) -------------------------


def grams_13(text: str) -> set[str]:
    """The set MinHash estimates: character 13-grams of the fuzzy-normalized text."""
    t = minhash.fuzzy_normalize(text)
    return {t[i : i + minhash.NGRAM] for i in range(max(1, len(t) - minhash.NGRAM + 1))}


def copy_in_bin(text: str, low: float, high: float, rng: random.Random) -> tuple[str, float]:
    """`text` with random words replaced until its 13-gram Jaccard with `text` is in [low, high): as few words
    as bring it under a target drawn in the bin, so that pairs spread over the bin, its low edge included."""
    words, original = text.split(" "), grams_13(text)
    for _ in range(20):
        order, target = rng.sample(range(len(words)), len(words)), rng.uniform(low, high)
        replacement = {i: f"q{rng.randrange(10**9)}z" for i in order}

        def edited(k: int, order: list[int] = order, replacement: dict = replacement) -> tuple[str, float]:
            changed = list(words)
            for i in order[:k]:
                changed[i] = replacement[i]
            copy = " ".join(changed)
            similarity = grams_13(copy)
            return copy, len(original & similarity) / len(original | similarity)

        first, last = 0, len(words)
        while first < last:  # the fewest replaced words that bring the similarity under the target
            middle = (first + last) // 2
            if edited(middle)[1] >= target:
                first = middle + 1
            else:
                last = middle
        copy, jaccard = edited(first)
        if low <= jaccard < high:
            return copy, jaccard
    raise AssertionError(f"no copy in [{low}, {high}) after 20 tries")


def test_near_duplicates_are_found_per_jaccard_bin_and_pairs_below_0_7_are_kept(tmp_path):
    """The goals of docs/dedup.md on pairs planted inside their bins: recall >= 0.95 for Jaccard in [0.85, 0.90),
    at most 1% of the pairs under 0.7 merged (here 40 pairs each, in other files than their originals)."""
    rng = random.Random(11)
    originals = [*sample_texts("c4_sample.jsonl", 40), *sample_texts("wikipedia_sample.jsonl", 40)]
    bins = {"[0.85, 0.90)": (0.85, 0.90), "[0.50, 0.70)": (0.5, 0.7)}
    copies = {name: [copy_in_bin(originals[i + 40 * n], *edges, rng) for i in range(40)]
              for n, (name, edges) in enumerate(bins.items())}
    write_jsonl(tmp_path / "rp/c4/c4-train.00000-of-01024.jsonl", originals[:40])
    write_jsonl(tmp_path / "rp/wikipedia/wiki.jsonl", originals[40:])
    write_jsonl(tmp_path / "rp/book/book.jsonl", [copy for copy, _ in copies["[0.85, 0.90)"]])
    write_jsonl(tmp_path / "rp/arxiv/arxiv_0.jsonl", [copy for copy, _ in copies["[0.50, 0.70)"]])
    out = tmp_path / "out"
    run([str(tmp_path / "rp")], out, None, decontaminate=None, exact=False)
    removed = {(Path(row["source"]).parent.name, row["line"]) for row in duplicates(out)}

    assert all(0.85 <= j < 0.90 for _, j in copies["[0.85, 0.90)"])
    assert all(0.5 <= j < 0.7 for _, j in copies["[0.50, 0.70)"])
    # a pair is merged when either of its documents is removed (lines count from 1)
    high = sum(("book", i + 1) in removed or ("c4", i + 1) in removed for i in range(40))
    low = sum(("arxiv", i + 1) in removed or ("wikipedia", i + 1) in removed for i in range(40))
    assert high / 40 >= 0.95, f"recall {high}/40 in [0.85, 0.90)"
    assert low / 40 <= 0.01, f"{low}/40 pairs under 0.7 merged"
