"""The datasets zsad reads, where their files are, and the check of a category folder before anomalib parses it.

Every dataset here has the MVTec AD layout and is parsed by anomalib's own ``make_mvtec_ad_dataset`` (the parser of
``MVTecAD`` and ``Visa``). That parser silently ignores some files — other extensions, files under symlinked
folders, files whose symlink points outside the category — and fails with a pandas shape error when an anomalous
image has no mask. :func:`scan_category` therefore walks the folder first, reports every such case as one
:class:`~zsad.data.errors.DatasetLayoutError` naming the files and the fix, and afterwards checks that anomalib's
table holds exactly the files on disk.

Layouts:

* ``mvtec`` — ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``,
  PNG only (as anomalib's ``MVTecADDataset``).
* ``visa`` — anomalib's prepared tree ``<root>/visa_pytorch/<category>/...`` (MVTec layout, one defect folder
  ``bad``, mask ``<name>.png``), written by anomalib's ``Visa.prepare_data`` from the raw download
  (``<root>/<category>/Data/...`` + ``<root>/split_csv/1cls.csv``); ``<root>`` may also be the prepared tree itself.
* ``gogan`` — MVTec layout, PNG or JPEG, categories ``nunozumi`` and ``tanizumi``.
* ``folder`` — any other dataset in the MVTec layout, PNG or JPEG.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_CATEGORIES
from anomalib.data.datasets.image.mvtecad import make_mvtec_ad_dataset
from anomalib.data.datasets.image.visa import CATEGORIES as VISA_CATEGORIES
from anomalib.data.errors import MisMatchError
from anomalib.data.utils.path import contains_non_printable_characters
from pandas import DataFrame

from zsad.data.errors import DatasetLayoutError, DatasetNotFoundError, Problem, format_problems

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
GOOD = "good"
GROUND_TRUTH = "ground_truth"
# Files an operating system or notebook drops into folders; never images.
_IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
# Suffixes that are images in some format, so a file with one of them in a split folder is not silently ignored.
_IMAGE_LIKE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jp2", ".heic"}
)

GOGAN_CATEGORIES = ("nunozumi", "tanizumi")
# Project naming of the Gogan defect folders [unverified against the real dataset] and the seed's Japanese names.
GOGAN_DEFECTS = {
    "crack_joint_opening": "ひび割れ/目地開き",
    "spalling_missing": "剥離/欠損/外れ",
    "efflorescence": "エフロレッセンス",
    "exudate": "溶出物",
}

_MVTEC_TREE = """\
  <root>/
    <category>/                  one folder per category{categories}
      train/good/                normal training images
      test/good/                 normal test images
      test/<defect>/             anomalous test images, one folder per defect type{defects}
      ground_truth/<defect>/     <name>_mask.png (or <name>.png) for every image of test/<defect>/, binary
  Images: {ext}."""


def _tree(ext: str, categories: Iterable[str] = (), defects: Iterable[str] = ()) -> str:
    categories, defects = list(categories), list(defects)
    return _MVTEC_TREE.format(
        ext=ext,
        categories=f" ({', '.join(categories[:4])}{', ...' if len(categories) > 4 else ''})" if categories else "",
        defects=f" ({', '.join(defects)})" if defects else "",
    )


@dataclass(frozen=True)
class DatasetSpec:
    """What zsad needs to know to read one dataset.

    Attributes:
        name: Short name used in configs and metric keys (``mvtec``, ``visa``, ``gogan``, ``folder``).
        title: Human name for messages.
        extensions: Image (and mask) file suffixes the parser reads.
        layout: The expected folder layout, shown in errors.
        source: Where to get the dataset, shown in errors.
        known_categories: The official categories (empty for folder datasets).
        prepared_subdir: Sub-folder of the root holding the category folders, if any (VisA: ``visa_pytorch``).
    """

    name: str
    title: str
    extensions: tuple[str, ...]
    layout: str
    source: str
    known_categories: tuple[str, ...] = ()
    prepared_subdir: str = ""
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def category_parent(self, root: Path) -> Path:
        """Folder whose sub-folders are the categories (VisA: ``root/visa_pytorch`` if present, else ``root``)."""
        if self.prepared_subdir and (root / self.prepared_subdir).is_dir():
            return root / self.prepared_subdir
        return root

    def describe(self) -> str:
        """Expected layout and source, appended to every not-found error."""
        return f"Expected layout of {self.title}:\n{self.layout}\n{self.source}"


_PNG_JPG = (".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".JPEG")

MVTEC = DatasetSpec(
    name="mvtec",
    title="MVTec AD",
    extensions=(".png", ".PNG"),
    layout=_tree("PNG", MVTEC_CATEGORIES),
    source=(
        "Get it from https://www.mvtec.com/company/research/datasets/mvtec-ad (CC BY-NC-SA 4.0) and extract it so "
        "that <root>/bottle/train/good exists, or pass download=True to let anomalib download it."
    ),
    known_categories=MVTEC_CATEGORIES,
    aliases=("mvtec_ad", "mvtecad"),
)
VISA = DatasetSpec(
    name="visa",
    title="VisA",
    extensions=(".png", ".jpg", ".JPG"),
    layout=(
        _tree(".JPG (masks .png)", VISA_CATEGORIES, ["bad"]).replace(
            "  <root>/", "  <root>/visa_pytorch/  (or <root> itself)"
        )
        + "\n  or the raw download: <root>/<category>/Data/{Images,Masks}/... + <root>/split_csv/1cls.csv,"
        "\n  which anomalib's Visa.prepare_data() converts into <root>/visa_pytorch/ (1cls split, masks != 0)."
    ),
    source=(
        "Get it from https://github.com/amazon-science/spot-diff (VisA_20220922.tar) and extract it into "
        "<root>, or pass download=True to let anomalib download it."
    ),
    known_categories=VISA_CATEGORIES,
    prepared_subdir="visa_pytorch",
)
GOGAN = DatasetSpec(
    name="gogan",
    title="Gogan (outdoor concrete blocks)",
    extensions=_PNG_JPG,
    layout=_tree(".png or .jpg, 256x256 (masks .png)", GOGAN_CATEGORIES, GOGAN_DEFECTS),
    source=(
        "The Gogan dataset is not public: obtain it from its authors and arrange it as above. For tests and demos, "
        "zsad.data.synthetic.make_gogan_like(root) writes a small generated dataset with this layout."
    ),
    known_categories=GOGAN_CATEGORIES,
)
FOLDER = DatasetSpec(
    name="folder",
    title="MVTec-layout folder dataset",
    extensions=_PNG_JPG,
    layout=_tree(".png or .jpg (masks .png)"),
    source="Arrange your dataset as above; zsad.data.synthetic.make_mvtec_like(root) writes an example.",
)

DATASETS: dict[str, DatasetSpec] = {}
for _spec in (MVTEC, VISA, GOGAN, FOLDER):
    for _key in (_spec.name, *_spec.aliases):
        DATASETS[_key] = _spec


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    """Look up a dataset by name (``mvtec``, ``visa``, ``gogan``, ``folder``).

    Raises:
        ValueError: Unknown name; the message lists the known ones.
    """
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DATASETS[dataset.lower()]
    except KeyError:
        msg = f"Unknown dataset {dataset!r}; choose one of {sorted({s.name for s in DATASETS.values()})}."
        raise ValueError(msg) from None


def is_visa_raw(root: Path) -> bool:
    """Whether ``root`` holds the raw VisA download (``split_csv/1cls.csv``) rather than the prepared tree."""
    return (root / "split_csv" / "1cls.csv").is_file()


def visa_csv_categories(root: Path) -> list[str]:
    """Categories listed in the raw VisA split file, in file order of first appearance."""
    with (root / "split_csv" / "1cls.csv").open(encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return list(dict.fromkeys(row[0] for row in reader if row))


def require_root(spec: DatasetSpec, root: str | Path) -> Path:
    """Return ``root`` as a Path, or raise with the expected layout if it is not a directory.

    Raises:
        DatasetNotFoundError: ``root`` does not exist or is not a directory.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        msg = f"{spec.title} not found: the root {str(path)!r} {what}.\n{spec.describe()}"
        raise DatasetNotFoundError(msg)
    return path


def _looks_like_category(folder: Path) -> bool:
    return folder.is_dir() and any((folder / split).is_dir() for split in (*SPLITS, GROUND_TRUTH))


def _root_hint(root: Path) -> str:
    """A hint for the common mistake of passing a category folder as the dataset root."""
    if _looks_like_category(root):
        return f" {str(root)!r} looks like a category folder itself: pass its parent {str(root.parent)!r} as root."
    return ""


def list_categories(spec: DatasetSpec, root: str | Path) -> list[str]:
    """Categories present under a dataset root, sorted.

    A category is a sub-folder with ``train/``, ``test/`` or ``ground_truth/``. For VisA the categories of
    ``split_csv/1cls.csv`` are used when present, because anomalib's conversion creates (empty) folders for all 12.

    Raises:
        DatasetNotFoundError: The root is missing or holds no category folder.
    """
    path = require_root(spec, root)
    if spec is VISA and is_visa_raw(path):
        return sorted(visa_csv_categories(path))
    parent = spec.category_parent(path)
    categories = sorted(entry.name for entry in parent.iterdir() if _looks_like_category(entry))
    if not categories:
        msg = (
            f"{spec.title} not found: no category folder (with train/ or test/) in {str(parent)!r}."
            f"{_root_hint(parent)}\n{spec.describe()}"
        )
        raise DatasetNotFoundError(msg)
    return categories


def category_root(spec: DatasetSpec, root: str | Path, category: str) -> Path:
    """The folder of one category, checked to exist.

    Raises:
        DatasetNotFoundError: The root is missing.
        DatasetLayoutError: The category does not exist (the message lists the ones that do).
    """
    path = require_root(spec, root)
    folder = spec.category_parent(path) / category
    if _looks_like_category(folder):
        return folder
    present = [entry.name for entry in sorted(spec.category_parent(path).iterdir()) if _looks_like_category(entry)]
    hint = f" Known {spec.title} categories: {', '.join(spec.known_categories)}." if spec.known_categories else ""
    if spec is VISA and is_visa_raw(path) and (path / category).is_dir():
        hint += " The raw VisA download is not converted yet: call prepare_data() first (the Trainer does)."
    msg = (
        f"Unknown {spec.title} category {category!r}: no folder {str(folder)!r} with train/ or test/. "
        f"Categories found under the root: {present or 'none'}.{hint}{_root_hint(path)}\n{spec.describe()}"
    )
    raise DatasetLayoutError(msg)


def _ignored(entry: Path) -> bool:
    return entry.name.startswith(".") or entry.name in _IGNORED_NAMES


def _symlink_problem(entry: Path, category_dir: Path) -> Problem:
    return Problem(
        entry,
        f"is a symlinked folder (-> {os.path.realpath(entry)}); anomalib's parser does not enter symlinked folders "
        "inside a category and would silently drop its images.",
        f"replace it by a real folder, or symlink the whole category folder instead ({category_dir.name}/ may be a "
        "symlink).",
    )


def _is_within(folder: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


@dataclass
class _Walk:
    images: dict[str, list[Path]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    masks: dict[Path, Path] = field(default_factory=dict)  # anomalous test image -> its mask
    problems: list[Problem] = field(default_factory=list)


def _collect_files(folder: Path, category_dir: Path, spec: DatasetSpec, walk: _Walk) -> list[Path]:
    """Usable image files directly in ``folder``; everything unusable becomes a problem."""
    files = []
    for entry in sorted(folder.iterdir()):
        if _ignored(entry):
            continue
        if entry.is_dir():
            fix = "move the images up one level" if not entry.is_symlink() else "replace the symlink by the files"
            walk.problems.append(
                Problem(entry, "is a folder nested inside a label folder; the parser expects files only here.", fix)
            )
        elif entry.suffix not in spec.extensions:
            kind = "an image format" if entry.suffix.lower() in _IMAGE_LIKE_SUFFIXES else "a file type"
            walk.problems.append(
                Problem(
                    entry,
                    f"has {kind} ({entry.suffix or 'no suffix'}) that {spec.title} does not read "
                    f"(accepted: {', '.join(spec.extensions)}); it would be silently ignored.",
                    "convert it to PNG, or move it out of the dataset.",
                )
            )
        elif entry.is_symlink() and not _is_within(category_dir, entry):
            walk.problems.append(
                Problem(
                    entry,
                    f"is a symlink to {os.path.realpath(entry)}, outside the category folder; anomalib's parser "
                    "silently drops such files.",
                    "copy the file into the dataset, or symlink the whole category folder instead.",
                )
            )
        else:
            files.append(entry)
    return files


def _find_mask(image: Path, mask_dir: Path, extensions: tuple[str, ...]) -> Path | None:
    for stem in (f"{image.stem}_mask", image.stem):
        for ext in (".png", ".PNG", *extensions):
            candidate = mask_dir / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _check_shared_stems(files: list[Path], walk: _Walk) -> None:
    """Report defect images whose names differ only in the suffix (``000.png`` + ``000.jpg``).

    Masks are found by stem (``000_mask.png``), so two such images would share one mask — anomalib's positional
    pairing then fails with a bare pandas length error.
    """
    by_stem: dict[str, list[Path]] = {}
    for image in files:
        by_stem.setdefault(image.stem, []).append(image)
    for stem, images in by_stem.items():
        if len(images) > 1:
            names = ", ".join(image.name for image in images)
            walk.problems.append(
                Problem(
                    images[0].parent,
                    f"holds {names}: images with the same name {stem!r} and different suffixes would share the mask "
                    f"{stem}_mask.png.",
                    "rename or delete all but one of them (and give each image its own mask).",
                )
            )


def _walk_category(spec: DatasetSpec, category_dir: Path) -> _Walk:
    walk = _Walk()
    for split in SPLITS:
        split_dir = category_dir / split
        if split_dir.is_symlink():
            walk.problems.append(_symlink_problem(split_dir, category_dir))
            continue
        if not split_dir.is_dir():
            continue
        for label_dir in sorted(split_dir.iterdir()):
            if _ignored(label_dir):
                continue
            if label_dir.is_symlink() and label_dir.is_dir():
                walk.problems.append(_symlink_problem(label_dir, category_dir))
                continue
            if not label_dir.is_dir():
                walk.problems.append(
                    Problem(
                        label_dir,
                        f"lies directly in {split}/; images must be in {split}/<label>/.",
                        f"move it into {split}/good/ (normal) or {split}/<defect>/ (anomalous).",
                    )
                )
                continue
            if split == "train" and label_dir.name != GOOD:
                walk.problems.append(
                    Problem(
                        label_dir,
                        "is a defect folder in train/; the training split holds normal images only.",
                        "move it to test/ (masks in ground_truth/), or rename it to good if its images are normal.",
                    )
                )
                continue
            files = _collect_files(label_dir, category_dir, spec, walk)
            walk.images[split] += files
            if split == "test" and label_dir.name != GOOD:
                mask_dir = category_dir / GROUND_TRUTH / label_dir.name
                _check_shared_stems(files, walk)
                for image in files:
                    mask = _find_mask(image, mask_dir, spec.extensions)
                    if mask is None:
                        walk.problems.append(
                            Problem(
                                image,
                                "is anomalous but has no mask (a defect image without a mask cannot be scored at "
                                "pixel level and anomalib's mask pairing would fail).",
                                f"add {GROUND_TRUTH}/{label_dir.name}/{image.stem}_mask.png, or move the image to "
                                "test/good/ if it is normal.",
                            )
                        )
                    else:
                        walk.masks[image] = mask
    _check_ground_truth(spec, category_dir, walk)
    _check_stray_images(spec, category_dir, walk)
    return walk


def _check_ground_truth(spec: DatasetSpec, category_dir: Path, walk: _Walk) -> None:
    """Masks without an image break anomalib's positional image-mask pairing: report them."""
    gt_dir = category_dir / GROUND_TRUTH
    if gt_dir.is_symlink():
        walk.problems.append(_symlink_problem(gt_dir, category_dir))
        return
    if not gt_dir.is_dir():
        return
    paired = set(walk.masks.values())
    for defect_dir in sorted(gt_dir.iterdir()):
        if _ignored(defect_dir) or not defect_dir.is_dir():
            continue
        if defect_dir.is_symlink():
            walk.problems.append(_symlink_problem(defect_dir, category_dir))
            continue
        for mask in _collect_files(defect_dir, category_dir, spec, walk):
            if mask not in paired:
                walk.problems.append(
                    Problem(
                        mask,
                        f"is a mask without an image in test/{defect_dir.name}/ (anomalib pairs masks with images "
                        "by sorted order, so one extra mask shifts every pairing).",
                        f"delete the mask, or restore test/{defect_dir.name}/{mask.stem.removesuffix('_mask')}.*",
                    )
                )


def _check_stray_images(spec: DatasetSpec, category_dir: Path, walk: _Walk) -> None:
    """Image files the parser would read that are not at ``<split>/<label>/<file>`` (their split would be wrong)."""
    known = {p for files in walk.images.values() for p in files} | set(walk.masks.values())
    reported = {problem.path for problem in walk.problems}
    for path in category_dir.rglob("*"):
        if path.suffix not in spec.extensions or path in known or path in reported or not path.is_file():
            continue
        relative = path.relative_to(category_dir)
        if relative.parts[0] in (*SPLITS, GROUND_TRUTH) and len(relative.parts) == 3:
            continue  # already reported through its folder (nested, wrong label, ...)
        if any(parent in reported for parent in path.parents):
            continue
        walk.problems.append(
            Problem(
                path,
                "is not in train/<label>/, test/<label>/ or ground_truth/<defect>/; the parser would assign it a "
                "wrong split.",
                "move it into the layout or out of the category folder.",
            )
        )


def scan_category(spec: DatasetSpec, root: str | Path, category: str) -> DataFrame:
    """Check one category folder, parse it with anomalib, and return its samples with a ``category`` column.

    Args:
        spec: The dataset.
        root: Dataset root.
        category: Category folder name.

    Returns:
        anomalib samples table (``path, split, label, image_path, label_index, mask_path``) of the train and test
        splits plus ``category``; every image file on disk is in it exactly once.

    Raises:
        DatasetNotFoundError: The root is missing.
        DatasetLayoutError: Unknown or empty category, or files anomalib would drop or mis-pair.
    """
    folder = category_root(spec, root, category)
    # anomalib resolves the category folder (so a symlinked category works); compare paths in the same form.
    resolved = folder.resolve()
    walk = _walk_category(spec, resolved)
    if walk.problems:
        msg = format_problems(
            f"{len(walk.problems)} layout problem(s) in {spec.title} category {category!r} ({folder}):", walk.problems
        )
        raise DatasetLayoutError(msg)
    if not walk.images["train"] and not walk.images["test"]:
        msg = (
            f"Empty {spec.title} category {category!r}: no {'/'.join(spec.extensions)} image in {folder}/train or "
            f"{folder}/test. Fix: add the images, or remove the folder / leave it out of `categories`.\n"
            f"{spec.describe()}"
        )
        raise DatasetLayoutError(msg)
    if contains_non_printable_characters(resolved):
        # anomalib's parser refuses any path outside printable ASCII (validate_path), e.g. Gogan's native category
        # names 布積み / 谷積み or an accented user folder. The walk above already paired every file, so the table is
        # built from it, in the parser's own format and order.
        samples = _samples_from_walk(resolved, walk)
    else:
        samples = _parse_with_anomalib(resolved, folder, spec)
    samples = samples[samples.split.isin(SPLITS)].reset_index(drop=True)
    _cross_check(samples, walk, folder)
    samples["category"] = category
    samples.attrs["task"] = "segmentation"
    return samples


def _samples_from_walk(resolved: Path, walk: _Walk) -> DataFrame:
    """The table of anomalib's parser (same columns, sorted by ``image_path``) from a checked category walk."""
    rows = [
        {
            "path": str(resolved),
            "split": split,
            "label": image.parent.name,
            "image_path": str(image),
            "label_index": int(image.parent.name != GOOD),
            "mask_path": str(walk.masks[image]) if image in walk.masks else None,
        }
        for split, images in walk.images.items()
        for image in images
    ]
    samples = DataFrame(rows, columns=["path", "split", "label", "image_path", "label_index", "mask_path"])
    return samples.sort_values(by="image_path", ignore_index=True)


def _parse_with_anomalib(resolved: Path, folder: Path, spec: DatasetSpec) -> DataFrame:
    try:
        return make_mvtec_ad_dataset(resolved, split=None, extensions=spec.extensions)
    except MisMatchError as err:
        msg = (
            f"anomalib could not pair images and masks in {folder}: {err} anomalib pairs them by sorted file name, "
            "so names like 1.png/10.png (sorted differently from 1_mask.png/10_mask.png) break it. Fix: zero-pad "
            "the file names (001.png, 010.png) of images and masks."
        )
        raise DatasetLayoutError(msg) from err


def _cross_check(samples: DataFrame, walk: _Walk, folder: Path) -> None:
    """Fail if anomalib's table and the files on disk differ (a file dropped or mis-paired for any reason)."""
    on_disk = {str(path) for files in walk.images.values() for path in files}
    parsed = set(samples.image_path)
    expected_masks = {str(image): str(mask) for image, mask in walk.masks.items()}
    wrong_masks = [
        Problem(row.image_path, f"was paired with {row.mask_path}.", "zero-pad the image and mask file names.")
        for row in samples.itertuples(index=False)
        if row.image_path in expected_masks and row.mask_path != expected_masks[row.image_path]
    ]
    problems = [
        *(Problem(p, "is on disk but anomalib's parser dropped it.", "check the file name.") for p in on_disk - parsed),
        *(Problem(p, "was parsed but is not an image of the layout.", "remove it.") for p in parsed - on_disk),
        *wrong_masks,
    ]
    if problems:
        raise DatasetLayoutError(
            format_problems(f"Parsing {folder} lost or mis-paired files:", sorted(problems, key=str))
        )


def select_split(samples: DataFrame, split: str, spec: DatasetSpec, category: str) -> DataFrame:
    """Rows of one split, refusing an empty result (an empty category must not vanish from a mean over categories).

    Raises:
        DatasetLayoutError: The category has no image in that split.
    """
    rows = samples[samples.split == split].reset_index(drop=True)
    rows.attrs["task"] = "segmentation"
    if rows.empty:
        msg = (
            f"Empty {spec.title} category {category!r}: no image in its {split}/ folder. Fix: add the images, or "
            "leave the category out of `categories`."
        )
        raise DatasetLayoutError(msg)
    return rows
