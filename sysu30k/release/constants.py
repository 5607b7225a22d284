"""Names and numbers of the released SYSU-30k layout and protocol: the one place they are spelled out.

See ../shared/docs/SYSU30K.md §1.3 (layout) and §2.1 (the official evaluator's label rules).
"""

TRAIN_DIR = "sysu_train_set_all"          # sysu_train_set_all/%010d/*.jpg
TEST_DIR = "sysu_test_set_all"            # sysu_test_set_all/{query,gallery}/%09d/<id>_c<cam>_<k>.jpg
QUERY_DIR = "query"
GALLERY_DIR = "gallery"
META_DIR = "meta"                          # meta/{train,query,gallery}.txt: paths relative to each subset root
BAG_LABEL_JSON = "bag_level_label.json"   # optional; bags follow the consecutive-folder rule without it
ARCHIVE_SEP = "::"                         # the source path of an image read from a tar: ARCHIVE::MEMBER

TRAIN_FOLDER_DIGITS = 10
TEST_ID_DIGITS = 9
DISTRACTOR_FOLDER = "0000others"           # gallery distractors: 0000others/0000others_c1_K.jpg
DISTRACTOR_PID = -1000                     # the official evaluator's label for a distractor
QUERY_CAMID = 2
GALLERY_CAMID = 1

SUBSETS = ("train", "query", "gallery")    # packing order and shard-name prefixes
BAG_WINDOWS = (1, 3, 5)                    # bags: 1, 3 and 5 consecutive folders centred on each folder

KEY_MAX_LEN = 64                           # tar member KEY.jpg: dot-free ASCII, at most this long
IMAGE_EXT = "jpg"

OFFICIAL_QUERIES = 1_000                   # the released test protocol (SYSU30K.md §2)
OFFICIAL_GALLERY = 479_730                 # 1,000 true matches + 478,730 distractors
OFFICIAL_TEST_IDS = range(28_311, 29_311)  # 000028311 … 000029310 (SYSU30K.md §1.1)
