"""The layout reader: disk is the truth, meta/*.txt is reconciled with it, names are parsed."""

import posixpath
from pathlib import Path

import imagefiles as f
import pytest

from sysu30k.errors import UserError
from sysu30k.ingest.layout import LayoutReject, SourceImage, SubsetReport, _stem, present_subsets, walk_subset
from sysu30k.ingest.source import Source
from sysu30k.io.storage import Storage


def put(root: Path, rel: str, data: bytes = b"") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data or f.rgb_jpeg())


def walk(root: Path, subset: str):
    report = SubsetReport()
    items = list(walk_subset(Source(Storage(str(root)), []), subset, report))
    return ([i for i in items if isinstance(i, SourceImage)], [i for i in items if isinstance(i, LayoutReject)],
            report)


def test_meta_is_intersected_with_disk(tmp_path):
    for rel in ("0000000001/a.jpg", "0000000001/b.jpg", "0000000002/c.jpg"):
        put(tmp_path, f"sysu_train_set_all/{rel}")
    put(tmp_path, "meta/train.txt", b"0000000001/a.jpg\n./0000000001/gone.jpg\n0000000007/x.jpg\n0000000002/c.jpg\r\n")
    images, rejects, report = walk(tmp_path, "train")
    assert [i.path for i in images] == ["sysu_train_set_all/0000000001/a.jpg", "sysu_train_set_all/0000000001/b.jpg",
                                       "sysu_train_set_all/0000000002/c.jpg"]
    assert [i.folder for i in images] == [1, 1, 2]
    assert {(r.path, r.reason) for r in rejects} == {
        ("sysu_train_set_all/0000000001/gone.jpg", "listed-missing"),
        ("sysu_train_set_all/0000000007/x.jpg", "listed-missing")}
    assert (report.on_disk, report.listed, report.listed_missing, report.unlisted) == (3, 4, 2, 1)
    assert report.unlisted_examples == ["sysu_train_set_all/0000000001/b.jpg"]


def test_without_meta_everything_on_disk_is_taken(tmp_path):
    put(tmp_path, "sysu_train_set_all/0000000003/z.jpg")
    images, rejects, report = walk(tmp_path, "train")
    assert len(images) == 1 and not rejects and report.listed is None


def test_test_names_are_parsed(tmp_path):
    put(tmp_path, "sysu_test_set_all/gallery/000028311/000028311_c1_1.jpg")
    put(tmp_path, "sysu_test_set_all/gallery/0000others/0000others_c1_17.jpg")
    put(tmp_path, "sysu_test_set_all/gallery/000028312/000028399_c1_1.jpg")       # id differs from folder
    put(tmp_path, "sysu_test_set_all/gallery/000028312/holiday.jpg")             # not <id>_c<cam>_<k>
    put(tmp_path, "sysu_test_set_all/query/0000others/0000others_c2_1.jpg")      # distractor in query
    images, rejects, _ = walk(tmp_path, "gallery")
    assert {(i.pid, i.camid, i.distractor, i.key) for i in images} == {
        (28311, 1, False, "000028311_c1_1"), (-1000, 1, True, "0000others_c1_17")}
    assert sorted(r.reason for r in rejects) == ["bad-name", "bad-name"]
    _, qrejects, _ = walk(tmp_path, "query")
    assert [r.reason for r in qrejects] == ["bad-name"] and "gallery" in qrejects[0].detail


def test_bad_training_folders_are_rejected_not_dropped(tmp_path):
    put(tmp_path, "sysu_train_set_all/holiday/a.jpg")
    put(tmp_path, "sysu_train_set_all/stray.jpg")
    put(tmp_path, "sysu_train_set_all/0000000001/nested/b.jpg")
    images, rejects, _ = walk(tmp_path, "train")
    assert not images
    assert sorted((r.path, r.reason) for r in rejects) == [
        ("sysu_train_set_all/0000000001/nested/b.jpg", "bad-folder"),
        ("sysu_train_set_all/holiday/a.jpg", "bad-folder"),
        ("sysu_train_set_all/stray.jpg", "bad-folder")]


def test_missing_tree_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="none of"):
        present_subsets(Source(Storage(str(tmp_path)), []))
    with pytest.raises(UserError, match="not a folder"):
        present_subsets(Source(Storage(str(tmp_path / "nope")), []))


@pytest.mark.parametrize("name", ["a.jpg", "a.b.jpg", ".jpg", "..jpg", "...a.jpg", "a", "a.", ".a.b", "x..jpg",
                                  " .jpg", ". .jpg", "ﬁlé.JPG", "0000others_c1_12.jpeg"])
def test_stem_is_splitext(name):
    assert _stem(name) == posixpath.splitext(name)[0]
