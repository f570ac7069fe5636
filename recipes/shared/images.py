"""Images of the scoring jobs' inputs (score.py, mpo/, eval/): where a named image is, and what it holds."""

import hashlib
import os


def resolve_image(image, base_dir: str | None, where: str, kind: str = "image"):
    """An image (or a video file: `kind`) the renderer can open: embedded bytes as they are, a relative path joined
    to `base_dir`."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image
        image = image.get("path")
    if image is None:
        raise ValueError(f"{where}: the {kind} is missing")
    if isinstance(image, str):
        if base_dir is not None and not os.path.isabs(image):
            image = os.path.join(base_dir, image)
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: {kind} file {image} does not exist")
    return image


def resolve_video(video, base_dir: str | None, where: str):
    """A video file or a list of frames (qwen-vl-utils' two forms), its paths joined to `base_dir`."""
    if isinstance(video, list) and video:
        return [resolve_image(frame, base_dir, where, "frame") for frame in video]
    if isinstance(video, str):
        return resolve_image(video, base_dir, where, "video")
    raise ValueError(f"{where}: a video is a file path or a non-empty list of frame paths; got {video!r:.80}")


def video_digest(video) -> str | list[str]:
    """`image_digest` of a video file, or of each frame of a frame list."""
    return [image_digest(frame) for frame in video] if isinstance(video, list) else image_digest(video)


def image_digest(image) -> str:
    """sha256 of what a resolved image holds (embedded bytes, or the file's bytes): the same picture under another
    name has the same digest, and a file replaced under its old name another one."""
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") else image["path"]
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    if hasattr(image, "tobytes"):  # a PIL image
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
    return hashlib.sha256(bytes(image)).hexdigest()
