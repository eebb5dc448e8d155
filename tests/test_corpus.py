from edgelm import corpus


def test_split_is_disjoint_and_stable():
    train = {d.name for d in corpus.documents("train")}
    held = {d.name for d in corpus.documents("heldout")}
    assert held and train and not train & held
    assert len(held) < len(train) / 20
    assert corpus.documents("heldout") == corpus.documents("heldout")


def test_bad_split():
    import pytest

    with pytest.raises(ValueError, match="split"):
        corpus.documents("validation")
