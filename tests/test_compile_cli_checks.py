"""`plait compile` / `plait eval` check what they are told before any work (issue #12, item 10):
a bad database URL, output path, optimizer setting or number is one line on stderr and exit
code 2, with no run started and no model loaded. Each case runs `plait` as a real subprocess
with a real SQLite store in a temp directory; "nothing started" is read from that store.
"""

import pytest

from plait.store import Store
from tests.lifecycle_fixtures import run, sst2_rows, write_jsonl

PROGRAM = "plait.pipelines.sentiment:Sentiment"


@pytest.fixture
def sst2(tmp_path, data_dir):
    return (
        write_jsonl(tmp_path / "train.jsonl", sst2_rows(data_dir, "train", 4)),
        write_jsonl(tmp_path / "dev.jsonl", sst2_rows(data_dir, "dev", 4)),
    )


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'runs.db'}"


def _refused(tmp_path, argv, *needles, db=None):
    """Run `plait argv`; it must fail with one line naming `needles` and leave no run behind."""
    result = run(argv, tmp_path / "home", timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    if db is not None and (tmp_path / "runs.db").exists():
        store = Store.open(db)
        try:
            assert store.runs() == [], "work started before the bad input was noticed"
        finally:
            store.close()


def _compile(sst2, tmp_path, db, *extra):
    train, dev = sst2
    return [
        "compile",
        PROGRAM,
        "--trainset",
        str(train),
        "--devset",
        str(dev),
        "--out",
        str(tmp_path / "out.json"),
        "--db",
        db,
        *extra,
    ]


def _eval(sst2, db, *extra):
    return ["eval", PROGRAM, "--devset", str(sst2[1]), "--db", db, *extra]


# ---- --db --------------------------------------------------------------------------------------
def test_a_database_url_without_a_dialect_is_one_line(tmp_path, sst2):
    _refused(tmp_path, _eval(sst2, "garbage://x"), "database URL", "garbage")


def test_a_database_in_a_missing_directory_is_refused_not_created(tmp_path, sst2):
    missing = tmp_path / "no" / "such" / "dir"
    _refused(tmp_path, _eval(sst2, f"sqlite:///{missing}/plait.db"), "does not exist")
    assert not (tmp_path / "no").exists()


# ---- output paths ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "out, needle",
    [
        ("missing/dir/out.json", "does not exist"),
        ("a_file/out.json", "not a directory"),
        ("a_directory", "is a directory"),
        ("/proc/out.json", "cannot write"),
    ],
)
def test_a_bad_out_is_found_before_anything_runs(tmp_path, sst2, db, out, needle):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_directory").mkdir()
    target = out if out.startswith("/") else str(tmp_path / out)
    argv = _compile(sst2, tmp_path, db)
    argv[argv.index("--out") + 1] = target
    _refused(tmp_path, argv, "--out", needle, db=db)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "out, needle", [("missing/r.json", "does not exist"), ("a_directory", "is a directory")]
)
def test_a_bad_json_out_is_found_before_anything_runs(tmp_path, sst2, db, out, needle):
    (tmp_path / "a_directory").mkdir()
    _refused(tmp_path, _eval(sst2, db, "--json-out", str(tmp_path / out)), "--json-out", needle, db=db)
    assert not (tmp_path / "missing").exists()


# ---- optimizer settings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer, arg, needles",
    [
        ("bootstrap", "max_bootstraped_demos=2", ("max_bootstraped_demos", "max_bootstrapped_demos")),
        ("labeled", "max_bootstrapped_demos=2", ("max_bootstrapped_demos", "k")),
        ("bootstrap", "max_rounds=x", ("max_rounds", "int")),
        ("bootstrap", "max_rounds=true", ("max_rounds", "int")),
        ("mipro", 'auto="huge"', ("auto", "light")),
        ("bootstrap", "metric=f1", ("metric", "plait sets")),
    ],
)
def test_bad_optimizer_args_are_found_before_anything_runs(tmp_path, sst2, db, optimizer, arg, needles):
    argv = _compile(sst2, tmp_path, db, "--optimizer", optimizer, "--optimizer-arg", arg)
    _refused(tmp_path, argv, "--optimizer-arg", *needles, db=db)


# ---- numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("compile", "--threads", "0"),
        ("compile", "--seed", "-1"),
        ("compile", "--seed", str(2**32)),  # NumPy refused it, after the baseline
        ("compile", "--limit", "0"),
        ("compile", "--max-tokens", "-3"),
        ("compile", "--max-metric-errors", "0"),
        ("eval", "--offset", "-1"),
        ("eval", "--show", "-2"),
        ("eval", "--threads", "x"),
    ],
)
def test_zero_or_negative_numbers_are_usage_errors(tmp_path, sst2, db, command, flag, value):
    argv = _compile(sst2, tmp_path, db) if command == "compile" else _eval(sst2, db)
    _refused(tmp_path, [*argv, flag, value], flag, db=db)
    assert not (tmp_path / "runs.db").exists()  # refused while parsing: not even the store opened
