"""RSNA layout discovery: UID checks, CSV validation and per-study problems, on tiny tmp layouts.

Image folders hold one dummy .dcm file each: discovery must not read pixels or headers.
"""

import codecs

import pytest

from cspine_ray import TARGETS
from cspine_ray.io.errors import LayoutError, StudyError
from cspine_ray.io.rsna import Layout, StudyRecord, check_uid, discover, resolves_inside

NEG = "1.2.826.0.1.3680043.1"       # no fracture
POS = "1.2.826.0.1.3680043.2"       # C2
POS2 = "1.2.826.0.1.3680043.10"     # C1 + C3
TEST_A, TEST_B = "1.2.826.0.1.3680043.901", "1.2.826.0.1.3680043.902"
TRAIN_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7"
BOX_HEADER = "StudyInstanceUID,x,y,width,height,slice_number"
TEST_HEADER = "row_id,StudyInstanceUID,prediction_type"


def write_csv(path, header, rows):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))


def add_images(root, part, uid, files=("1.dcm",)):
    folder = root / part / uid
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"not a real DICOM: discovery must not open it")
    return folder


def label_row(uid, patient, *vertebrae):
    return f"{uid},{patient}," + ",".join(vertebrae)


def csv_rows(uid):
    return [f"{uid}_{t},{uid},{t}" for t in TARGETS]


def make_layout(root, train=True, test=True):
    """A clean layout: three train studies, boxes, two segmentations, two test studies."""
    root.mkdir(parents=True, exist_ok=True)
    if train:
        write_csv(root / "train.csv", TRAIN_HEADER, [
            label_row(NEG, 0, *"0000000"),
            label_row(POS, 1, *"0100000"),
            label_row(POS2, 1, *"1010000"),
        ])
        for uid in (NEG, POS, POS2):
            add_images(root, "train_images", uid, files=("1.dcm", "2.dcm"))
        write_csv(root / "train_bounding_boxes.csv", BOX_HEADER, [
            f"{POS},10.5,20,30,40,12", f"{POS2},1,2,3,4,7", f"{POS},11,21,31,41.5,11",
        ])
        (root / "segmentations").mkdir()
        (root / "segmentations" / f"{NEG}.nii").write_bytes(b"dummy")
        (root / "segmentations" / f"{POS2}.nii.gz").write_bytes(b"dummy")
    if test:
        for uid in (TEST_A, TEST_B):
            add_images(root, "test_images", uid)
        write_csv(root / "test.csv", TEST_HEADER, csv_rows(TEST_A) + csv_rows(TEST_B))
        write_csv(root / "sample_submission.csv", "row_id,fractured",
                  [f"{TEST_A}_{t},0.5" for t in TARGETS])
    return root


def problems_for(layout: Layout, uid: str) -> list[str]:
    return [p.problem for p in layout.problems if p.study == uid]


def uids(layout: Layout, split: str | None = None) -> list[str]:
    return [r.uid for r in layout.studies if split is None or r.split == split]


# --- check_uid -----------------------------------------------------------------------------

@pytest.mark.parametrize("uid", ["1", "1.2.3", "1.2.826.0.1.3680043.20574", "9" * 64])
def test_check_uid_accepts_dotted_numbers(uid):
    assert check_uid(uid) == uid


@pytest.mark.parametrize("uid", [
    "../x", "a/b", "/etc/passwd", "1.2/../3", "", " ", "1.2 ", " 1.2", "1.2\n", "1..2", ".1",
    "1.", "1.2.x", "\u0661\u0662\u0663", "1.\uff12", "9" * 65, "1\\2",
])
def test_check_uid_refuses_everything_else(uid):
    with pytest.raises(ValueError, match="invalid StudyInstanceUID") as error:
        check_uid(uid)
    assert repr(uid)[:30] in str(error.value)


def test_check_uid_refuses_non_strings():
    with pytest.raises(ValueError, match="not a string"):
        check_uid(123)


# --- the happy path ------------------------------------------------------------------------

def test_happy_path(tmp_path):
    layout = discover(make_layout(tmp_path))
    assert layout.problems == []
    assert layout.root == tmp_path
    assert [(r.split, r.uid) for r in layout.studies] == sorted(
        [("train", NEG), ("train", POS), ("train", POS2), ("test", TEST_A), ("test", TEST_B)])
    records = {r.uid: r for r in layout.studies}
    pos = records[POS]
    assert isinstance(pos, StudyRecord)
    assert pos.split == "train" and pos.image_dir == tmp_path / "train_images" / POS
    assert pos.labels == {"C1": 0, "C2": 1, "C3": 0, "C4": 0, "C5": 0, "C6": 0, "C7": 0,
                          "patient_overall": 1}
    assert pos.fracture_boxes == ((11.0, 21.0, 31.0, 41.5, 11), (10.5, 20.0, 30.0, 40.0, 12))
    assert pos.segmentation is None
    assert records[NEG].segmentation == tmp_path / "segmentations" / f"{NEG}.nii"
    assert records[NEG].fracture_boxes == ()
    assert records[POS2].segmentation == tmp_path / "segmentations" / f"{POS2}.nii.gz"
    test_a = records[TEST_A]
    assert (test_a.split, test_a.labels, test_a.segmentation, test_a.fracture_boxes) == \
        ("test", None, None, ())
    assert test_a.image_dir == tmp_path / "test_images" / TEST_A


def test_train_only_and_test_only_layouts(tmp_path):
    train_only = discover(make_layout(tmp_path / "a", test=False))
    assert train_only.problems == [] and uids(train_only, "test") == []
    assert uids(train_only) == sorted([NEG, POS, POS2])
    test_only = discover(make_layout(tmp_path / "b", train=False))
    assert test_only.problems == [] and uids(test_only) == [TEST_A, TEST_B]


def test_not_an_rsna_layout(tmp_path):
    with pytest.raises(ValueError, match="not an RSNA layout: .* neither train.csv nor test_images"):
        discover(tmp_path)
    with pytest.raises(ValueError, match="not an RSNA layout: .* is not a directory"):
        discover(tmp_path / "nowhere")


# --- file-level faults ---------------------------------------------------------------------

@pytest.mark.parametrize("name, header, missing", [
    ("train.csv", "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6", "C7"),
    ("train.csv", "uid,patient_overall,C1,C2,C3,C4,C5,C6,C7", "StudyInstanceUID"),
    ("train_bounding_boxes.csv", "StudyInstanceUID,x,y,w,h,slice_number", "width, height"),
    ("test.csv", "row_id,StudyInstanceUID", "prediction_type"),
])
def test_missing_columns_raise_naming_file_and_columns(tmp_path, name, header, missing):
    make_layout(tmp_path)
    write_csv(tmp_path / name, header, [])
    with pytest.raises(ValueError, match=rf"{name}: missing columns {missing}"):
        discover(tmp_path)


def test_empty_csv_raises_naming_file(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(ValueError, match="train.csv: empty file"):
        discover(tmp_path)


def train_csv_text():
    return "\n".join([TRAIN_HEADER, label_row(NEG, 0, *"0000000"), label_row(POS, 1, *"0100000"),
                      label_row(POS2, 1, *"1010000")]) + "\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_csv_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    # spreadsheets save "Unicode text" as UTF-16 with a byte-order mark; decoded, not refused
    clean = discover(make_layout(tmp_path / "clean"))
    root = make_layout(tmp_path / "marked")
    raw = train_csv_text().encode(encoding)
    if encoding == "utf-16-be":
        raw = codecs.BOM_UTF16_BE + raw  # the -be codec writes no mark of its own
    (root / "train.csv").write_bytes(raw)
    layout = discover(root)
    assert layout.problems == []
    assert [(r.uid, r.labels) for r in layout.studies] == [(r.uid, r.labels) for r in clean.studies]


@pytest.mark.parametrize("content, message", [
    (b"", r"train\.csv: empty file, expected columns StudyInstanceUID"),
    (b" \n\n", r"train\.csv: empty file"),
    (train_csv_text().replace("C1", "C\xe9").encode("latin-1"),
     r"train\.csv: not UTF-8 text \(byte 0xe9 at offset \d+ cannot be decoded\); save it as a UTF-8 CSV"),
    (train_csv_text().encode("utf-16-le"), r"train\.csv: not a text CSV file \(it holds NUL bytes"),
    (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb3", r"train\.csv: not UTF-8 text"),  # an .xlsx
    (("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n" + NEG + ",0,0\n1,2,3,4,5,6,7,8,9,10,11\n")
     .encode(), r"train\.csv: not a CSV file \(Error tokenizing data"),
])
def test_unreadable_csv_is_one_layout_error_naming_the_file(tmp_path, content, message):
    make_layout(tmp_path)
    (tmp_path / "train.csv").write_bytes(content)
    with pytest.raises(LayoutError, match=message) as error:
        discover(tmp_path)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


# --- the symlink policy: links are followed only inside the data root ----------------------

def test_resolves_inside(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "in").symlink_to(root / "a")
    (root / "out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "root-link").symlink_to(root)
    assert resolves_inside(root / "a", root) and resolves_inside(root / "in", root)
    assert not resolves_inside(root / "out", root)
    assert not resolves_inside(tmp_path / "rootx", root)  # a prefix is not a parent
    # the root may itself be a link (data on shared storage): both sides are resolved
    assert resolves_inside(tmp_path / "root-link" / "a", root)
    assert resolves_inside(root / "a", tmp_path / "root-link")


def test_study_folders_linked_inside_the_root_are_followed_outside_refused(tmp_path):
    root = make_layout(tmp_path / "root")
    rewrite_train(root, [label_row("1.5", 0, *"0000000"), label_row("1.6", 0, *"0000000")])
    add_images(root, "store", "1.5")                       # root/store/1.5: inside the root
    (root / "train_images" / "1.5").symlink_to(root / "store" / "1.5")
    add_images(tmp_path, "outside", "1.6")                 # beside the root, not in it
    (root / "train_images" / "1.6").symlink_to(tmp_path / "outside" / "1.6")
    layout = discover(root)
    assert "1.5" in uids(layout) and problems_for(layout, "1.5") == []  # followed silently
    assert "1.6" not in uids(layout)
    assert problems_for(layout, "1.6") == [
        "train_images/1.6 links outside the data root; refused (symlinks are followed only "
        "within the root)"]


def test_segmentations_linked_outside_the_root_are_dropped(tmp_path):
    root = make_layout(tmp_path / "root")
    seg = root / "segmentations"
    (root / "store").mkdir()
    (seg / f"{NEG}.nii").rename(root / "store" / "neg.nii")
    (seg / f"{NEG}.nii").symlink_to(root / "store" / "neg.nii")       # inside: used
    (tmp_path / "pos2.nii.gz").write_bytes(b"dummy")
    (seg / f"{POS2}.nii.gz").unlink()
    (seg / f"{POS2}.nii.gz").symlink_to(tmp_path / "pos2.nii.gz")     # outside: refused
    layout = discover(root)
    records = {r.uid: r for r in layout.studies}
    assert records[NEG].segmentation == seg / f"{NEG}.nii" and problems_for(layout, NEG) == []
    assert records[POS2].segmentation is None  # the study stays, with its labels
    assert records[POS2].labels["C1"] == 1
    assert problems_for(layout, POS2) == [
        f"segmentations/{POS2}.nii.gz links outside the data root; refused (symlinks are "
        "followed only within the root); segmentation dropped, the study is kept without it"]


# --- train.csv values ----------------------------------------------------------------------

def rewrite_train(root, extra_rows, keep=(NEG, POS, POS2)):
    rows = {NEG: label_row(NEG, 0, *"0000000"), POS: label_row(POS, 1, *"0100000"),
            POS2: label_row(POS2, 1, *"1010000")}
    write_csv(root / "train.csv", TRAIN_HEADER, [rows[u] for u in keep] + extra_rows)


@pytest.mark.parametrize("cells, message", [
    ("1,0,0,2,0,0,0,0", "C3='2' is not 0 or 1"),
    ("1,0,0,,0,0,0,1", "C3='' is not 0 or 1"),
    ("1,0,0,NaN,0,0,0,1", "C3='NaN' is not 0 or 1"),
    ("1.0,0,0,1,0,0,0,0", "patient_overall='1.0' is not 0 or 1"),
    ("0,0,0,1,0,1,0,0", "patient_overall=0 but C3=1, C5=1"),
    ("1,0,0,0,0,0,0,0", "patient_overall=1 but C1..C7 are all 0"),
])
def test_bad_label_values_exclude_the_study(tmp_path, cells, message):
    make_layout(tmp_path)
    uid = "1.2.3.4"
    add_images(tmp_path, "train_images", uid)
    rewrite_train(tmp_path, [f"{uid},{cells}"])
    layout = discover(tmp_path)
    assert problems_for(layout, uid) == [f"train.csv line 5: {message}"]
    assert uid not in uids(layout)
    assert uids(layout, "train") == sorted([NEG, POS, POS2])


def test_duplicated_study_is_excluded(tmp_path):
    make_layout(tmp_path)
    rewrite_train(tmp_path, [label_row(NEG, 0, *"0000000")])
    layout = discover(tmp_path)
    assert problems_for(layout, NEG) == ["listed 2 times in train.csv (lines 2, 5)"]
    assert uids(layout, "train") == sorted([POS, POS2])


def test_hostile_uid_in_train_csv_is_never_followed(tmp_path):
    root = make_layout(tmp_path / "root")
    add_images(tmp_path, "", "x")  # tmp_path/x/1.dcm: what "train_images/../../x" would reach
    add_images(root, "", "x")
    rewrite_train(root, [label_row("../x", 0, *"0000000"), label_row("../../x", 0, *"0000000"),
                         label_row("", 0, *"0000000")])
    layout = discover(root)
    assert problems_for(layout, "../x") == [
        "train.csv line 5: invalid StudyInstanceUID '../x': must be dotted digits like "
        "1.2.826.0.1; row ignored"]
    assert len(problems_for(layout, "../../x")) == 1
    assert problems_for(layout, "") == ["train.csv line 7: invalid StudyInstanceUID '': empty; "
                                        "row ignored"]
    assert uids(layout) == uids(discover(make_layout(tmp_path / "clean")))


# --- images --------------------------------------------------------------------------------

def test_listed_without_images(tmp_path):
    make_layout(tmp_path)
    missing, empty, not_folder = "1.1", "1.2", "1.4"
    (tmp_path / "train_images" / empty).mkdir()
    (tmp_path / "train_images" / not_folder).write_text("x")
    rewrite_train(tmp_path, [label_row(u, 0, *"0000000") for u in (missing, empty, not_folder)])
    layout = discover(tmp_path)
    assert problems_for(layout, missing) == [f"listed in train.csv but train_images/{missing} is missing"]
    assert problems_for(layout, empty) == [f"train_images/{empty} has no files"]
    assert problems_for(layout, not_folder) == [f"train_images/{not_folder} is not a folder"]
    assert uids(layout, "train") == sorted([NEG, POS, POS2])


def test_files_need_no_dcm_extension(tmp_path):
    # many exports name slices by number or UID alone: the reader decides what is DICOM
    make_layout(tmp_path)
    add_images(tmp_path, "train_images", "1.3", files=("1", "2", "1.2.840.7"))
    rewrite_train(tmp_path, [label_row("1.3", 0, *"0000000")])
    layout = discover(tmp_path)
    assert "1.3" in uids(layout, "train") and problems_for(layout, "1.3") == []


def test_dcm_suffix_is_case_insensitive(tmp_path):
    make_layout(tmp_path)
    add_images(tmp_path, "train_images", "1.5", files=("1.DCM",))
    rewrite_train(tmp_path, [label_row("1.5", 0, *"0000000")])
    assert "1.5" in uids(discover(tmp_path), "train")


def test_images_without_labels(tmp_path):
    make_layout(tmp_path)
    add_images(tmp_path, "train_images", "7.7.7")
    layout = discover(tmp_path)
    assert problems_for(layout, "7.7.7") == ["train_images/7.7.7 has no row in train.csv; ignored"]
    assert "7.7.7" not in uids(layout)


@pytest.mark.parametrize("part", ["train_images", "test_images"])
def test_invalid_folder_names_are_problems_not_studies(tmp_path, part):
    make_layout(tmp_path)
    for name in ("not-a-uid", "..x", "\u0661\u0662", "1.2 "):
        add_images(tmp_path, part, name)
    (tmp_path / part / ".DS_Store").write_text("")
    layout = discover(tmp_path)
    for name in ("not-a-uid", "..x", "\u0661\u0662", "1.2 ", ".DS_Store"):
        [problem] = problems_for(layout, name)
        assert problem.startswith(f"{part}/{name!r}: invalid StudyInstanceUID")
        assert problem.endswith("; ignored")
    assert len(layout.problems) == 5
    assert len(layout.studies) == 5


# --- bounding boxes ------------------------------------------------------------------------

def write_boxes(root, rows):
    write_csv(root / "train_bounding_boxes.csv", BOX_HEADER,
              [f"{POS},10.5,20,30,40,12", f"{POS2},1,2,3,4,7"] + rows)


@pytest.mark.parametrize("box, message", [
    (f"{POS},-1,20,30,40,13", "x='-1' must be a finite number >= 0"),
    (f"{POS},1,20,-30,40,13", "width='-30' must be a finite number > 0"),  # reversed corners
    (f"{POS},1,20,30,0,13", "height='0' must be a finite number > 0"),     # no area
    (f"{POS},,20,30,40,13", "x='' must be a finite number >= 0"),
    (f"{POS},NaN,20,30,nan,13", "x='NaN' must be a finite number >= 0, "
                                "height='nan' must be a finite number > 0"),
    (f"{POS},1,2,3,inf,13", "height='inf' must be a finite number > 0"),
    (f"{POS},1,2,3,4,13.5", "slice_number='13.5' must be an integer >= 0"),
    (f"{POS},1,2,3,4,abc", "slice_number='abc' must be an integer >= 0"),
    (f"{POS},1,2,3,4,-2", "slice_number='-2' must be an integer >= 0"),
])
def test_a_bad_box_drops_that_studys_boxes_only(tmp_path, box, message):
    make_layout(tmp_path)
    write_boxes(tmp_path, [box])
    layout = discover(tmp_path)
    assert problems_for(layout, POS) == [f"train_bounding_boxes.csv line 4: {message}; all 2 "
                                         "fracture box(es) of this study dropped, its labels kept"]
    records = {r.uid: r for r in layout.studies}
    assert records[POS].fracture_boxes == ()  # the good box of line 2 goes too
    assert records[POS].labels["C2"] == 1 and records[POS].labels["patient_overall"] == 1
    assert records[POS2].fracture_boxes == ((1.0, 2.0, 3.0, 4.0, 7),)


def test_integral_float_slice_number_is_accepted(tmp_path):
    make_layout(tmp_path)
    write_boxes(tmp_path, [f"{POS},1,2,3,4,13.0"])
    layout = discover(tmp_path)
    assert layout.problems == []
    [pos] = [r for r in layout.studies if r.uid == POS]
    assert pos.fracture_boxes[-1] == (1.0, 2.0, 3.0, 4.0, 13)
    assert isinstance(pos.fracture_boxes[-1][4], int)


def test_boxes_for_unknown_or_hostile_studies(tmp_path):
    make_layout(tmp_path)
    write_boxes(tmp_path, ["5.5.5,1,2,3,4,5", "../x,1,2,3,4,5", "/etc,1,2,3,4,5"])
    layout = discover(tmp_path)
    assert problems_for(layout, "5.5.5") == [
        "train_bounding_boxes.csv line 4: box for a study not in train.csv; ignored"]
    assert problems_for(layout, "../x") == [
        "train_bounding_boxes.csv line 5: invalid StudyInstanceUID '../x': must be dotted digits "
        "like 1.2.826.0.1; row ignored"]
    assert len(problems_for(layout, "/etc")) == 1
    assert len(layout.studies) == 5  # informative only: every real study kept


def test_boxes_on_a_negative_study(tmp_path):
    make_layout(tmp_path)
    write_boxes(tmp_path, [f"{NEG},1,2,3,4,5"])
    layout = discover(tmp_path)
    assert problems_for(layout, NEG) == [
        "has 1 fracture box(es) in train_bounding_boxes.csv but patient_overall=0"]
    assert NEG not in uids(layout)


# --- segmentations -------------------------------------------------------------------------

def test_segmentation_problems(tmp_path):
    make_layout(tmp_path)
    seg = tmp_path / "segmentations"
    (seg / f"{NEG}.nii.gz").write_bytes(b"dummy")   # now both .nii and .nii.gz
    (seg / "3.3.nii").write_bytes(b"dummy")          # no such study
    (seg / "..x.nii").write_bytes(b"dummy")          # not a UID
    (seg / "readme.txt").write_text("hi")
    layout = discover(tmp_path)
    assert problems_for(layout, NEG) == [f"more than one segmentation: {NEG}.nii, {NEG}.nii.gz; "
                                         "segmentation dropped, the study is kept without it"]
    assert [r.segmentation for r in layout.studies if r.uid == NEG] == [None]
    assert problems_for(layout, "3.3") == ["segmentations/3.3.nii is for a study not in train.csv; "
                                           "ignored"]
    assert problems_for(layout, "..x")[0].startswith("segmentations/'..x.nii': invalid")
    assert problems_for(layout, "readme.txt") == [
        "segmentations/'readme.txt' is not a .nii or .nii.gz file; ignored"]
    assert [r.segmentation.name for r in layout.studies if r.uid == POS2] == [f"{POS2}.nii.gz"]


# --- test part -----------------------------------------------------------------------------

def test_test_csv_studies_without_images_are_informative(tmp_path):
    make_layout(tmp_path)
    write_csv(tmp_path / "test.csv", TEST_HEADER,
              csv_rows(TEST_A) + csv_rows(TEST_B) + csv_rows("4.4.4"))
    layout = discover(tmp_path)
    assert problems_for(layout, "4.4.4") == [
        "listed in test.csv (line 18) but test_images/4.4.4 is missing; "
        "predictions cover the studies present"]
    assert uids(layout, "test") == [TEST_A, TEST_B]


def test_test_folders_without_test_csv_are_studies(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "test.csv").unlink()
    add_images(tmp_path, "test_images", "8.8")
    (tmp_path / "test_images" / "8.9").mkdir()
    layout = discover(tmp_path)
    assert uids(layout, "test") == [TEST_A, TEST_B, "8.8"]
    assert problems_for(layout, "8.9") == ["test_images/8.9 has no files"]


def test_test_csv_without_test_images(tmp_path):
    make_layout(tmp_path, test=False)
    write_csv(tmp_path / "test.csv", TEST_HEADER, csv_rows(TEST_A))
    layout = discover(tmp_path)
    assert uids(layout, "test") == []
    assert len(problems_for(layout, TEST_A)) == 1
    assert "test_images/" + TEST_A + " is missing" in problems_for(layout, TEST_A)[0]


def test_test_csv_rows_that_disagree(tmp_path):
    make_layout(tmp_path)
    rows = csv_rows(TEST_A)
    rows[2] = f"{TEST_A}_C2,{TEST_A},C3"              # row_id says C2, prediction_type C3
    rows[3] = f"{TEST_B}_C4,{TEST_A},C4"              # row_id names another study
    rows[4] = f"{TEST_A}_C8,{TEST_A},C8"              # no such target
    rows[5] = "../x_C6,../x,C6"
    write_csv(tmp_path / "test.csv", TEST_HEADER, rows + csv_rows(TEST_B))
    layout = discover(tmp_path)
    assert problems_for(layout, TEST_A) == [
        f"test.csv line 4: row_id='{TEST_A}_C2' disagrees with StudyInstanceUID and "
        f"prediction_type (expected {TEST_A}_C3)",
        f"test.csv line 5: row_id='{TEST_B}_C4' disagrees with StudyInstanceUID and "
        f"prediction_type (expected {TEST_A}_C4)",
        "test.csv line 6: prediction_type='C8' is not one of " + ", ".join(TARGETS),
    ]
    assert problems_for(layout, "../x")[0].startswith("test.csv line 7: invalid StudyInstanceUID")
    assert uids(layout, "test") == [TEST_A, TEST_B]  # test.csv is advisory; the folders decide


def test_study_in_both_train_and_test(tmp_path):
    make_layout(tmp_path)
    add_images(tmp_path, "test_images", POS)
    layout = discover(tmp_path)
    assert problems_for(layout, POS) == ["present in both train_images and test_images; "
                                         "test copy ignored"]
    assert [(r.split, r.uid) for r in layout.studies if r.uid == POS] == [("train", POS)]


def test_problems_are_study_errors(tmp_path):
    make_layout(tmp_path)
    add_images(tmp_path, "train_images", "7.7.7")
    [problem] = discover(tmp_path).problems
    assert isinstance(problem, StudyError)
    assert str(problem) == "study 7.7.7: train_images/7.7.7 has no row in train.csv; ignored"
