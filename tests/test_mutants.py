"""The mutation check's list stays in step with the code (every snippet occurs exactly once, so
each mutant applies as written), and its machinery runs a mutant end to end on a copy."""

import pytest

from attention_kernels.testing import mutants


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_to_the_current_sources(m):
    assert not mutants.problems(m), mutants.problems(m)
    assert m.tests and all(t.startswith("tests/") for t in m.tests), m.tests
    for t in m.tests:  # each selection names a test file (or a test in it) that exists
        assert (mutants.REPO / t.split("::")[0]).is_file(), t
    assert m.description and "\n" not in m.description


def test_names_are_unique_and_the_list_is_curated():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names)) and 20 <= len(names) <= 40


def test_a_snippet_that_is_not_there_exactly_once_is_refused(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\ny = 2\n")
    twice = mutants.mutant("twice", "d", [("a.py", "x = 1", "x = 2")], ["tests/t.py"])
    missing = mutants.mutant("missing", "d", [("a.py", "z = 3", "z = 4")], ["tests/t.py"])
    once = mutants.mutant("once", "d", [("a.py", "y = 2", "y = 3")], ["tests/t.py"])
    for m, times in ((twice, 2), (missing, 0)):
        assert f"occurs {times} times" in mutants.problems(m, tmp_path)[0]
        with pytest.raises(mutants.SnippetError):
            mutants.apply(m, tmp_path)
    mutants.apply(once, tmp_path)
    assert (tmp_path / "a.py").read_text() == "x = 1\nx = 1\ny = 3\n"


def test_the_copy_is_the_repository_without_its_environment():
    files = mutants.source_files()
    assert "pyproject.toml" in files and "attention_kernels/testing/mutants.py" in files and "tests/conftest.py" in files
    assert not any(f.startswith((".venv/", ".git/", "build/")) or "__pycache__" in f for f in files)


def test_tables():
    results = [mutants.Result("a", ["attention_kernels/kernels/x.py"], "killed", "tests/t.py::test_a[1|2]", 3.2),
               mutants.Result("b", ["attention_kernels/y.py"], "survived", "5 passed", 10.0)]
    text = mutants.table(results)
    assert "kernels/x.py" in text and "killed" in text and "10 s" in text
    md = mutants.table(results, markdown=True).splitlines()
    assert md[0].startswith("| mutant | file |") and len(md) == 4 and "\\|" in md[2]
    assert mutants.summary(results, 13).startswith("2 mutants: 1 killed, 1 survived, 0 not judged")


def test_one_mutant_end_to_end():
    # the whole machinery on a cheap mutant: the copy, the mutation there (not here), the copy's
    # package imported (not this editable install's), the first failing test reported
    m = mutants.BY_NAME["sdpa-ignores-scale"]
    before = (mutants.REPO / m.edits[0].file).read_text()
    result = mutants.run_one(m, timeout=300)
    assert (mutants.REPO / m.edits[0].file).read_text() == before
    assert result.status == "killed", (result.caught_by, result.log[-2000:])
    assert result.caught_by == "tests/test_sdpa.py::test_scale_and_transposed_layout"


def test_the_command_line_lists_and_refuses_unknown_names(capsys):
    assert mutants.main(["--list", "--only", "gqa-interleaved"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gqa-interleaved  (attention_kernels/kernels/common.py)") and "STALE" not in out
    with pytest.raises(SystemExit):
        mutants.main(["--only", "no-such-mutant"])
