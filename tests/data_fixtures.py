"""Writers of tiny COCO and CUB-200-2011 trees in the exact official file formats (for tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# The 80 COCO 2014 category ids (1..90 with gaps), as in the official instances files.
COCO_CATEGORY_IDS = (
    list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
    + [67, 70] + list(range(72, 83)) + list(range(84, 91))
)
assert len(COCO_CATEGORY_IDS) == 80


@dataclass
class CocoImage:
    """One image of the tiny COCO tree.

    ``captions``: (COCO annotation id, text in captions_*.json, text in dataset_coco.json or None if
    the Karpathy split leaves that caption out).
    """

    image_id: int
    folder: str  # train2014 | val2014
    karpathy_split: str  # train | restval | val | test
    captions: list[tuple[int, str, str | None]]
    category_ids: list[int] = field(default_factory=list)
    grayscale: bool = False

    @property
    def file_name(self) -> str:
        return f"COCO_{self.folder}_{self.image_id:012d}.jpg"


def default_coco_images() -> list[CocoImage]:
    """Seven images over both folders and all four Karpathy splits, with the quirks of real COCO:
    a sixth caption Karpathy drops, whitespace / case differences, a duplicate caption, a grayscale
    JPEG, an image with no instance annotation, and category ids with gaps (90 -> index 79)."""

    def caps(base: int, texts: list[str]) -> list[tuple[int, str, str | None]]:
        return [(base + i, text, text) for i, text in enumerate(texts)]

    return [
        CocoImage(9, "train2014", "train", caps(1000, [f"a plate of food number {i}" for i in range(5)]), [1, 1, 90]),
        CocoImage(
            25, "train2014", "train",
            [
                (2001, "A giraffe eating leaves.", "A giraffe  eating leaves. "),  # whitespace differs
                (2002, "A tall giraffe.", "a tall giraffe"),  # case and punctuation differ
                (2003, "two giraffes", "two giraffes"),
                (2004, "two giraffes", "two giraffes"),  # duplicate text: must get distinct ids
                (2005, "a giraffe in a zoo", "a giraffe in a zoo"),
                (2006, "an extra sixth caption", None),  # Karpathy keeps five
            ],
            [25],
        ),
        CocoImage(
            42, "val2014", "restval", caps(3000, [f"a dog on a couch {i}" for i in range(5)]), [18, 63], grayscale=True
        ),
        CocoImage(30, "train2014", "val", caps(4000, [f"a vase with flowers {i}" for i in range(5)]), [86, 64]),
        CocoImage(73, "val2014", "val", caps(5000, [f"a motorcycle parked {i}" for i in range(5)]), []),
        CocoImage(34, "train2014", "test", caps(6000, [f"a zebra grazing {i}" for i in range(5)]), [24, 24, 24]),
        CocoImage(74, "val2014", "test", caps(7000, [f"a dog in a street {i}" for i in range(5)]), [18, 3, 1]),
    ]


def expected_multi_hot(category_ids: list[int]) -> list[int]:
    """80-d vector: entry k is 1 iff the k-th smallest COCO category id occurs (computed by hand)."""
    return [1 if category_id in category_ids else 0 for category_id in COCO_CATEGORY_IDS]


def write_jpeg(path: Path, seed: int, grayscale: bool = False, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), ((53 * seed) % 256, (97 * seed) % 256, (29 * seed) % 256))
    (image.convert("L") if grayscale else image).save(path, format="JPEG")


def write_coco_tree(root: Path, images: list[CocoImage] | None = None, write_images: bool = True) -> list[CocoImage]:
    """Write annotations/{captions,instances}_{train,val}2014.json, dataset_coco.json and the JPEGs."""
    images = default_coco_images() if images is None else images
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": "thing", "id": c, "name": f"category {c}"} for c in COCO_CATEGORY_IDS]
    instance_id = 900000
    for part in ("train", "val"):
        mine = [im for im in images if im.folder == f"{part}2014"]
        image_entries = [
            {"license": 3, "file_name": im.file_name, "coco_url": "http://x", "height": 8, "width": 8,
             "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://y", "id": im.image_id}
            for im in mine
        ]
        info = {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "version": "1.0"}
        licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}]
        captions = {
            "info": info,
            "images": image_entries,
            "licenses": licenses,
            "annotations": [
                {"image_id": im.image_id, "id": ann_id, "caption": text}
                for im in mine
                for ann_id, text, _ in im.captions
            ],
        }
        annotations = []
        for im in mine:
            for category_id in im.category_ids:
                instance_id += 1
                annotations.append(
                    {"segmentation": [[1.0, 1.5, 6.0, 1.0, 6.5, 6.0]], "area": 12.5, "iscrowd": 0,
                     "image_id": im.image_id, "bbox": [1.0, 1.0, 5.5, 5.0], "category_id": category_id,
                     "id": instance_id}
                )
        instances = {"info": info, "images": image_entries, "licenses": licenses, "annotations": annotations,
                     "categories": categories}
        (root / "annotations" / f"captions_{part}2014.json").write_text(json.dumps(captions))
        (root / "annotations" / f"instances_{part}2014.json").write_text(json.dumps(instances))
    sentence_id = 0
    karpathy_images = []
    for index, im in enumerate(images):
        sentences = []
        for _, _, karpathy_text in im.captions:
            if karpathy_text is None:
                continue
            sentences.append({"tokens": karpathy_text.lower().split(), "raw": karpathy_text, "imgid": index,
                              "sentid": sentence_id})
            sentence_id += 1
        karpathy_images.append(
            {"filepath": im.folder, "sentids": [s["sentid"] for s in sentences], "filename": im.file_name,
             "imgid": index, "split": im.karpathy_split, "sentences": sentences, "cocoid": im.image_id}
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy_images, "dataset": "coco"}))
    if write_images:
        for im in images:
            write_jpeg(root / im.folder / im.file_name, im.image_id, im.grayscale)
    return images


CUB_CLASSES = (
    "001.Black_footed_Albatross",
    "002.Laysan_Albatross",
    "003.Sooty_Albatross",
    "004.Groove_billed_Ani",
    "005.Crested_Auklet",
)
CUB_TEST_CLASSES = ("003.Sooty_Albatross",)
CUB_TRAIN_CLASSES = (
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "004.Groove_billed_Ani", "005.Crested_Auklet"
)


def cub_image_name(class_dir: str, image_id: int) -> str:
    return f"{class_dir}/{class_dir.split('.', 1)[1]}_{image_id:04d}_{image_id + 100}.jpg"


def cub_caption(image_id: int, line: int) -> str:
    return f"this bird number {image_id} has feature {line}"


def write_cub_tree(root: Path, images_per_class: int = 2, captions_per_image: int = 10) -> dict[int, str]:
    """Write images.txt, image_class_labels.txt, classes.txt, images/, text_c10/ and the class split.

    Image ids interleave the classes (like nothing in particular) to check ordering by id.
    Returns image id -> class dir.
    """
    root.mkdir(parents=True, exist_ok=True)
    image_class = {}
    image_id = 0
    for _ in range(images_per_class):
        for class_dir in CUB_CLASSES:
            image_id += 1
            image_class[image_id] = class_dir
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CUB_CLASSES)))
    (root / "images.txt").write_text("".join(f"{i} {cub_image_name(c, i)}\n" for i, c in image_class.items()))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {CUB_CLASSES.index(c) + 1}\n" for i, c in image_class.items())
    )
    for i, class_dir in image_class.items():
        name = cub_image_name(class_dir, i)
        write_jpeg(root / "images" / name, i)
        text_path = root / "text_c10" / name.replace(".jpg", ".txt")
        text_path.parent.mkdir(parents=True, exist_ok=True)
        text_path.write_text("".join(cub_caption(i, line) + "\n" for line in range(captions_per_image)))
    (root / "trainvalclasses.txt").write_text("".join(c + "\n" for c in CUB_TRAIN_CLASSES))
    (root / "testclasses.txt").write_text("".join(c + "\n" for c in CUB_TEST_CLASSES))
    return image_class
