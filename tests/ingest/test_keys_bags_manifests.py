"""Keys, bags and the manifest contract."""

import json

import pytest

from sysu30k import manifests
from sysu30k.errors import UserError
from sysu30k.ingest.keys import is_valid_key, make_key
from sysu30k.release.bags import bags_to_json, consecutive_bags, parse_bag_json

WEIRD = "ﬁlé näme. with spaces.and.dots " + "x" * 62 + ".v2"   # + ".jpg": 100 chars, dotted, spaced, non-ASCII


def test_plain_names_keep_their_key():
    assert make_key(("0000000001", "img_0001"), "a/b.jpg") == "0000000001_img_0001"
    assert make_key(("000028311_c2_2",), "q/000028311_c2_2.jpg") == "000028311_c2_2"


def test_awkward_names_get_safe_distinct_keys():
    assert len(WEIRD + ".jpg") == 100
    k1 = make_key(("0000000001", WEIRD), f"t/0000000001/{WEIRD}.jpg")
    k2 = make_key(("0000000001", WEIRD), f"t/0000000001/{WEIRD}x.jpg")
    for k in (k1, k2):
        assert is_valid_key(k) and len(k) <= 64 and "." not in k and k.isascii() and " " not in k
    assert k1 != k2 and k1.startswith("0000000001_")
    assert make_key(("a b",), "a b.jpg") != make_key(("a_b",), "a_b.jpg")


def test_consecutive_bags_windows_and_clipping():
    folders = [f"{i:010d}" for i in range(1, 8)]
    bags = {b.bag_id: b for b in consecutive_bags(folders)}
    assert len(bags) == 3 * len(folders)
    assert bags["bag0000000009"].label == (3,)                      # folder 3, window 1
    assert bags["bag0000000010"].label == (2, 3, 4)                 # window 3
    assert bags["bag0000000011"].label == (1, 2, 3, 4, 5)           # window 5
    assert bags["bag0000000005"].label == (1, 1, 1, 2, 3)           # clipped at the start
    assert bags["bag0000000023"].label == (5, 6, 7, 7, 7)           # clipped at the end
    assert bags["bag0000000010"].folders == tuple(f"{i:010d}" for i in (2, 3, 4))


def test_bag_json_round_trip_and_errors():
    bags = consecutive_bags([f"{i:010d}" for i in range(1, 5)])
    assert parse_bag_json(bags_to_json(bags)) == bags
    record = json.loads(bags_to_json(bags))[1]
    assert record == {"BagLabel": [1, 1, 2], "BagID": "bag0000000004",
                      "BagImages": ["0000000001/*", "0000000001/*", "0000000002/*"]}
    with pytest.raises(UserError, match="not valid JSON"):
        parse_bag_json("{oops")
    with pytest.raises(UserError, match="record 0"):
        parse_bag_json('[{"BagID": "b", "BagLabel": [1], "BagImages": ["0000000001/x.jpg"]}]')


def test_manifest_readme_is_generated_from_the_schema():
    from pathlib import Path

    readme = Path(manifests.__file__).with_name("README.md").read_text("utf-8")
    assert readme == manifests.markdown(), "run: python -m sysu30k.manifests > manifests/README.md"


def test_schemas_cover_the_documented_columns():
    assert manifests.tables()[:4] == ["images", "bags", "shards", "rejects"]
    assert {"split", "holdout"} <= set(manifests.tables())
    images = manifests.schema("images")
    for name in ("key", "subset", "path", "folder", "pid", "camid", "distractor", "shard", "offset", "size",
                 "width", "height", "sha256"):
        assert name in images.names
    assert str(manifests.schema("bags").field("label").type) == "list<item: int32>"


@pytest.mark.parametrize("labels", [("train", 7, None, None, False), ("query", None, 28311, 2, False),
                                    ("gallery", None, -1000, 1, True), ("gallery", None, 0, 0, False)])
def test_label_bytes_are_canonical_json(labels):
    import json

    from sysu30k.ingest.labels import label_bytes

    subset, folder, pid, camid, distractor = labels
    want = {"subset": subset, "folder": folder, "pid": pid, "camid": camid, "distractor": distractor}
    assert label_bytes(*labels) == json.dumps(want, sort_keys=True, separators=(",", ":")).encode()
