"""Header parsing: the fast walk agrees with pydicom, charsets decode, bad files say why."""

from __future__ import annotations

import glob
import os

import pydicom
import pytest

from dtools.dicom import header as H
from dtools.errors import InputError

DATA = os.path.dirname(pydicom.data.__file__)
CORPUS = sorted(
    p for p in glob.glob(os.path.join(DATA, "test_files", "**", "*"), recursive=True)
    + glob.glob(os.path.join(DATA, "charset_files", "*.dcm"))
    if os.path.isfile(p)
)


def test_corpus_is_there():
    assert len(CORPUS) > 80


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: os.path.basename(p))
def test_fast_walk_matches_pydicom(path):
    try:
        fast = H.read_header(path)
    except InputError:
        fast = None
    try:
        slow = H._read_with_pydicom(path)
    except InputError:
        slow = None
    if fast is None or slow is None:
        # The fast walk also reports truncation pydicom misses (it stops before pixels),
        # and reads files without a preamble that pydicom refuses without force=True.
        return
    common = set(fast.attrs) & set(slow.attrs)
    for key in common:
        assert fast.attrs[key] == slow.attrs[key], key
    missing = {k for k in slow.attrs if k not in fast.attrs}
    assert not missing, missing


@pytest.mark.parametrize(
    "name,expected",
    [
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),
        ("chrJapMulti.dcm", "やまだ^たろう"),
        ("chrKoreanMulti.dcm", "김희중"),
        ("chrRuss.dcm", "Люкceмбypг"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrArab.dcm", "قباني^لنزار"),
        ("chrHbrw.dcm", "שרון^דבורה"),
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ],
)
def test_charset_names_are_unicode(name, expected):
    h = H.read_header(os.path.join(DATA, "charset_files", name))
    assert expected in h.attrs["PatientName"]
    ds = pydicom.dcmread(os.path.join(DATA, "charset_files", name))
    ds.decode()
    assert h.attrs["PatientName"] == str(ds.PatientName)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "text.dcm").write_text("hello, not dicom at all\n" * 10)
    with pytest.raises(InputError, match="not a DICOM file"):
        H.read_header(tmp_path / "text.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        H.read_header(tmp_path / "empty.dcm")
    whole = open(os.path.join(DATA, "test_files", "CT_small.dcm"), "rb").read()
    for cut in (140, 300, 1000, len(whole) // 2):  # the last one is inside Pixel Data
        (tmp_path / "cut.dcm").write_bytes(whole[:cut])
        with pytest.raises(InputError, match="truncated"):
            H.read_header(tmp_path / "cut.dcm")
    with pytest.raises(InputError, match="no such file"):
        H.read_header(tmp_path / "missing.dcm")
    with pytest.raises(InputError, match="directory"):
        H.read_header(tmp_path)


def test_implicit_and_big_endian_files():
    implicit = H.read_header(os.path.join(DATA, "test_files", "MR_small_implicit.dcm"))
    big = H.read_header(os.path.join(DATA, "test_files", "MR_small_bigendian.dcm"))
    explicit = H.read_header(os.path.join(DATA, "test_files", "MR_small.dcm"))
    assert implicit.attrs["PatientName"] == big.attrs["PatientName"] == explicit.attrs["PatientName"]
    assert implicit.transfer_syntax == "1.2.840.10008.1.2"
    assert big.transfer_syntax == "1.2.840.10008.1.2.2"
