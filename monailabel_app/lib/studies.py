"""``--studies`` may also be a MONAI/Decathlon dataset folder, such as the repository's ``sample_data/``.

MONAI Label's local datastore wants the volumes at the top of the studies folder and writes its files there
(``labels/``, ``datastore_v2.json``, ``.lock``). A dataset folder keeps its volumes in sub-folders listed by a
``dataset.json``; pointing the datastore at it would find no volume, and writing into it would modify the data
(inside a git checkout for ``sample_data/``). So for such a folder the app links every listed image into a
working folder, ``<app>/model/studies/<dataset folder name>/`` (git-ignored), and the datastore works there:
the volumes are read from the dataset folder, the annotators' labels are written to the working folder. The
dataset's own ground-truth labels are not imported (they are what annotators would produce).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, List, Tuple

logger = logging.getLogger(__name__)

# the volume file formats MONAI Label reads (lower case); lib/imageio.py checks uploads against the same list
VOLUME_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# 2D images, served by the 2D model (lib/configs/medurwkv2d.py; checked by lib/image2d.py)
IMAGE_2D_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg")
STUDY_SUFFIXES: Tuple[str, ...] = VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES


def _has_volumes(folder: str) -> bool:
    return any(f.lower().endswith(STUDY_SUFFIXES) for f in os.listdir(folder))


def _images(datalist: dict) -> Iterable[str]:
    for key, value in datalist.items():
        if not isinstance(value, list):
            continue
        for item in value:
            image = item.get("image") if isinstance(item, dict) else item if isinstance(item, str) else None
            if isinstance(image, str):
                yield image


def resolve_studies(studies: str, app_dir: str) -> str:
    """The folder the local datastore should use for ``studies`` (see the module docstring)."""
    if not os.path.isdir(studies) or _has_volumes(studies):
        return studies
    ds_file = os.path.join(studies, "dataset.json")
    if not os.path.isfile(ds_file):
        return studies
    with open(ds_file) as f:
        datalist = json.load(f)

    sources: List[str] = []
    for image in _images(datalist):
        path = os.path.realpath(os.path.join(studies, image))
        if path.lower().endswith(STUDY_SUFFIXES) and os.path.isfile(path) and path not in sources:
            sources.append(path)
    if not sources:
        return studies

    work = os.path.join(app_dir, "model", "studies", os.path.basename(os.path.realpath(studies)))
    os.makedirs(work, exist_ok=True)
    names = set()
    for src in sources:
        name = os.path.basename(src)
        if name in names:
            logger.warning(f"Skipping {src}: another listed image is also named {name}")
            continue
        names.add(name)
        link = os.path.join(work, name)
        if os.path.islink(link) and os.path.realpath(link) != src:
            os.remove(link)
        if not os.path.lexists(link):
            os.symlink(src, link)
    logger.info(
        f"Studies: {len(names)} volume(s) listed in {ds_file} are linked into {work}; labels and datastore files "
        f"are written there, the dataset folder is only read."
    )
    return work
