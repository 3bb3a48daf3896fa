"""Dataset formats and the annotations reader, including every bad input the issue lists."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aspire.data import load_dataset, load_image, load_mask
from aspire.data.annotations import read_annotations
from aspire.errors import DataError


def _png(path: Path, color=(10, 20, 30), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _waterbirds(root: Path, rows, header="img_filename,y,split,place", classes=("landbird", "waterbird")):
    root.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(str(v) for v in r) for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for r in rows:
        _png(root / str(r[0]))
    return root


ROWS = [("a/1.png", 0, 0, 0), ("a/2.png", 1, 0, 1), ("b/3.png", 1, 1, 0), ("b/4.png", 0, 2, 1)]


def test_waterbirds_loads_samples_groups_and_class_names(tmp_path):
    ds = load_dataset(_waterbirds(tmp_path / "d", ROWS))
    assert ds.class_names == ["landbird", "waterbird"]
    assert ds.attr_name == "place" and ds.has_groups
    assert [(s.image, s.y, s.split, s.attr) for s in ds.samples] == [
        ("a/1.png", 0, "train", 0), ("a/2.png", 1, "train", 1), ("b/3.png", 1, "val", 0), ("b/4.png", 0, "test", 1)]
    assert Path(ds.samples[0].path).is_file()
    assert len(ds.split("train")) == 2


def test_waterbirds_groups_are_optional_and_attr_column_selectable(tmp_path):
    ds = load_dataset(_waterbirds(tmp_path / "d", [r[:3] for r in ROWS], header="img_filename,y,split", classes=None))
    assert ds.attr_name is None and not ds.has_groups
    assert ds.class_names == ["0", "1"]
    rows = [(*r, 1 - r[3]) for r in ROWS]
    ds = load_dataset(_waterbirds(tmp_path / "e", rows, header="img_filename,y,split,place,sky"), attr="sky")
    assert ds.attr_name == "sky" and [s.attr for s in ds.samples] == [1, 0, 1, 0]


def test_celeba_format(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    attrs = ["image_id,Blond_Hair,Male,Smiling", "1.jpg,1,-1,1", "2.jpg,-1,1,1", "3.jpg,-1,-1,-1"]
    (root / "list_attr_celeba.csv").write_text("\n".join(attrs) + "\n")
    (root / "list_eval_partition.csv").write_text("image_id,partition\n1.jpg,0\n2.jpg,1\n3.jpg,2\n")
    for i in (1, 2, 3):
        _png(root / "img_align_celeba" / f"{i}.jpg")
    ds = load_dataset(root, "celeba")
    assert [(s.y, s.attr, s.split) for s in ds.samples] == [(1, 0, "train"), (0, 1, "val"), (0, 0, "test")]
    assert ds.class_names == ["not Blond_Hair", "Blond_Hair"]
    ds = load_dataset(root, "celeba", target="Smiling", attr="Blond_Hair")
    assert [(s.y, s.attr) for s in ds.samples] == [(1, 1), (1, 0), (0, 0)]
    with pytest.raises(DataError, match="'Wavy_Hair'"):
        load_dataset(root, "celeba", target="Wavy_Hair")


def test_imagefolder_format(tmp_path):
    root = tmp_path / "if"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            _png(root / split / cls / f"{split}_{cls}.png")
    ds = load_dataset(root, "imagefolder")
    assert ds.class_names == ["cat", "dog"] and not ds.has_groups
    assert sorted((s.split, s.y) for s in ds.samples) == [("train", 0), ("train", 1), ("val", 0), ("val", 1)]
    with pytest.raises(DataError, match="'test' has no samples"):
        ds.split("test")


@pytest.mark.parametrize("header,rows,message", [
    ("img_filename,split,place", [("a/1.png", 0, 0)], "required column 'y' is missing"),
    ("img_filename,y,place", [("a/1.png", 0, 0)], "required column 'split' is missing"),
    ("img_filename,y,split,place", [("a/1.png", "x", 0, 0)], "column 'y' has non-integer value 'x'"),
    ("img_filename,y,split,place", [("a/1.png", 2, 0, 0)], "label 2 out of range"),
    ("img_filename,y,split,place", [("a/1.png", -1, 0, 0)], "label -1 out of range"),
    ("img_filename,y,split,place", [("a/1.png", 0, 5, 0)], "column 'split' has value 5"),
])
def test_waterbirds_bad_metadata_names_the_column_or_value(tmp_path, header, rows, message):
    root = _waterbirds(tmp_path / "d", rows, header=header)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(root)
    assert "metadata.csv" in str(e.value) and "\n" not in str(e.value)


def test_missing_attr_column_and_missing_image_are_named(tmp_path):
    root = _waterbirds(tmp_path / "d", ROWS)
    with pytest.raises(DataError, match="attribute column 'sky' is missing"):
        load_dataset(root, attr="sky")
    (root / "b/4.png").unlink()
    with pytest.raises(DataError, match=r"b/4.png: image file is missing"):
        load_dataset(root)


def test_empty_split_and_empty_metadata(tmp_path):
    root = _waterbirds(tmp_path / "d", [("a/1.png", 0, 0, 0)])
    ds = load_dataset(root)
    with pytest.raises(DataError, match="split 'test' has no samples"):
        ds.split("test")
    empty = _waterbirds(tmp_path / "e", [])
    with pytest.raises(DataError, match="no rows"):
        load_dataset(empty)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"bad.png: corrupt or unreadable image"):
        load_image(bad)
    with pytest.raises(DataError, match="image file is missing"):
        load_image(tmp_path / "none.png")


def test_unknown_format_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="unknown dataset format 'coco'"):
        load_dataset(tmp_path, "coco")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_annotations_reader_resolves_masks_and_names_bad_lines(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    line = {"image": "a/1.png", "caption": "a bird on a lake", "regions": [{"phrase": "lake", "mask": "masks/m.png"}]}
    path = tmp_path / "annotations.jsonl"
    path.write_text(json.dumps(line) + "\n\n")
    ann = read_annotations(path)
    region = ann["a/1.png"].regions[0]
    assert region.phrase == "lake" and load_mask(region.mask_png, (8, 8)).sum() == 9
    with pytest.raises(DataError, match=r"m.png: mask size 8x8 differs from image size 4x4"):
        load_mask(region.mask_png, (4, 4))

    path.write_text(json.dumps(line) + "\n{broken\n")
    with pytest.raises(DataError, match=r"annotations.jsonl:2: invalid JSON"):
        read_annotations(path)
    path.write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(DataError, match="field 'caption' is missing"):
        read_annotations(path)
    path.write_text(json.dumps({**line, "regions": [{"phrase": "sea", "mask": "masks/none.png"}]}) + "\n")
    with pytest.raises(DataError, match="none.png is missing"):
        read_annotations(path)


def test_a_spreadsheet_csv_with_bom_and_crlf_reads_and_a_repeated_row_is_named(tmp_path):
    root = _waterbirds(tmp_path / "d", ROWS)
    text = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    ds = load_dataset(root)
    assert [s.image for s in ds.samples] == [r[0] for r in ROWS] and ds.attr_name == "place"
    (root / "metadata.csv").write_text(text + "a/2.png,1,0,1\n")
    with pytest.raises(DataError, match=r"metadata.csv:6: column 'img_filename' repeats 'a/2.png' \(first on line 3\)"):
        load_dataset(root)


def test_images_of_any_mode_load_as_8_bit_rgb(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")            # 16-bit grayscale: scaled, not clipped to white
    g16 = np.asarray(load_image(tmp_path / "g16.png"))
    assert g16.dtype == np.uint8 and g16.shape == (16, 16, 3)
    assert g16[0, 0, 0] == 0 and g16[-1, -1, 0] == 255 and g16[8, 8, 0] == 136   # pixel 136 of a 256-step ramp
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3] = 200, 255                      # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(a[0, 0]) == (200, 0, 0) and tuple(a[3, 3]) == (255, 255, 255)   # composited on white
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 0]) == (10, 200, 10)
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert tuple(np.asarray(load_image(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)


def test_a_checkpoint_of_other_classes_is_refused_and_a_spelling_difference_warned(tmp_path, capsys):
    from types import SimpleNamespace

    from aspire.models.evaluate import check_classes

    ds = load_dataset(_waterbirds(tmp_path / "d", ROWS))
    clf = lambda *names: SimpleNamespace(class_names=list(names), source="m.pt")  # noqa: E731
    check_classes(clf("landbird", "waterbird"), ds)
    with pytest.raises(DataError, match=r"m.pt has 3 classes \(a, b, c\) but .*metadata.csv names 2 \(landbird, waterbird\)"):
        check_classes(clf("a", "b", "c"), ds)
    with pytest.raises(DataError, match=r"m.pt: class 0 is 'cat' but .*metadata.csv's is 'landbird'"):
        check_classes(clf("cat", "waterbird"), ds)
    with pytest.raises(DataError, match=r"m.pt: class 0 is 'waterbird'"):
        check_classes(clf("waterbird", "landbird"), ds)          # the same names in another order
    check_classes(clf("Land_Bird", "waterbird"), ds)
    assert "'Land_Bird' (checkpoint) = 'landbird' (dataset)" in capsys.readouterr().err
    unnamed = load_dataset(_waterbirds(tmp_path / "u", ROWS, classes=()))
    check_classes(clf("x", "y", "z"), unnamed)                    # labels only: any checkpoint covering them
    with pytest.raises(DataError, match=r"labels go up to 1 but m.pt has 1 classes"):
        check_classes(clf("x"), unnamed)


def test_an_image_too_small_for_the_classifier_names_its_size(tmp_path):
    from aspire.data.images import min_image_side
    Image.new("RGB", (178, 218)).save(tmp_path / "face.png")    # CelebA's size, for a 224 px ResNet: enlarged 1.26x
    assert load_image(tmp_path / "face.png", min_side=min_image_side(224)).size == (178, 218)
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(DataError, match=r"dot.png: image 1x1 is too small for the classifier: each side must be "
                                        r"at least 112 px"):
        load_image(tmp_path / "dot.png", min_side=min_image_side(224))
    assert min_image_side(64) == 32 and load_image(tmp_path / "dot.png").size == (1, 1)   # no classifier: any size
