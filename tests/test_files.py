import pytest

from clipshield.files import atomic_path, json_object


@pytest.mark.parametrize("folder", [False, True])
def test_atomic_path_replaces_only_when_complete(tmp_path, folder):
    target = tmp_path / "out"
    (target.mkdir() if folder else target.write_text("old"))

    def write(tmp, text):
        if folder:
            tmp.mkdir()
            (tmp / "f").write_text(text)
        else:
            tmp.write_text(text)
    read = (lambda: (target / "f").read_text() if (target / "f").exists() else "old") if folder else target.read_text
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            write(tmp, "half")
            raise RuntimeError("interrupted")
    assert read() == "old" and not (tmp_path / "out.partial").exists()
    with atomic_path(target) as tmp:
        write(tmp, "new")
    assert read() == "new" and not (tmp_path / "out.partial").exists()


def test_json_object_names_the_place_and_the_fix():
    assert json_object(b'{"a": 1}', "x.json", "fix it", ValueError) == {"a": 1}
    with pytest.raises(KeyError, match="x.json is not valid JSON .*; fix it"):
        json_object(b"{", "x.json", "fix it", KeyError)
    with pytest.raises(ValueError, match="x.json must hold a JSON object, not list; fix it"):
        json_object("[1]", "x.json", "fix it", ValueError)
