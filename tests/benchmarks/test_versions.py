"""Results name the code that measured them, also from a copy of the tree without its git history."""

from benchmarks import measure


def test_a_commit_given_in_the_environment_names_the_code(monkeypatch):
    monkeypatch.setenv("OTEACHECK_COMMIT", "abc1234")
    assert measure.versions()["oteacheck_commit"] == "abc1234"


def test_without_it_the_checkout_names_itself(monkeypatch):
    monkeypatch.delenv("OTEACHECK_COMMIT", raising=False)
    commit = measure.versions()["oteacheck_commit"]
    assert commit and commit.split("+")[0].isalnum()
