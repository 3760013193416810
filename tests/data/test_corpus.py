"""Corpus loading (embedded Bible, .txt file, folder) and the deterministic train/held-out split."""

import pytest

from longreach.data.corpus import load_documents, split_documents


def test_kjv_books_are_documents():
    docs = load_documents("kjv")
    assert len(docs) == 66
    assert docs[0].startswith("The First Book of Moses, called Genesis\n\n1:1 In the beginning")
    assert "Revelation" in docs[-1].splitlines()[0]
    assert 4_000_000 < sum(map(len, docs)) < 4_600_000
    assert all(len(d) > 1000 for d in docs)


def test_split_deterministic_disjoint_and_close_to_fraction():
    docs = load_documents("kjv")
    total = sum(map(len, docs))
    for seed in range(3):
        train, held = split_documents(docs, 0.05, seed)
        assert (train, held) == split_documents(docs, 0.05, seed)
        assert train and held
        assert len(train) + len(held) == len(docs)
        assert sorted(train + held) == sorted(docs)
        assert 0.03 < sum(map(len, held)) / total <= 0.05
    assert split_documents(docs, 0.05, 0)[1] != split_documents(docs, 0.05, 1)[1]


def test_split_never_empty_even_for_tiny_fractions():
    docs = ["a" * 10, "b" * 1000, "c" * 5]
    train, held = split_documents(docs, 0.001, 0)
    assert len(held) == 1 and len(train) == 2
    train, held = split_documents(["x", "y"], 0.99, 0)
    assert len(held) == 1 and len(train) == 1


def test_split_errors():
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only one"], 0.1, 0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(["a", "b"], 1.0, 0)


def test_txt_file_and_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "sub" / "c.txt").write_text("third doc")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_documents(str(tmp_path)) == ["first doc", "second doc", "third doc"]
    assert load_documents(str(tmp_path / "a.txt")) == ["first doc"]


def test_bad_sources_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.source.*kjv.*\.txt"):
        load_documents(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"data\.source.*no \.txt"):
        load_documents(str(tmp_path))
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(ValueError, match=r"data\.source.*not a \.txt"):
        load_documents(str(tmp_path / "x.md"))
