"""The rules of the ObjectStyles benchmark, in one place: its domains, the class tables that map each
source's own folders and Unicode subgroups to classes, the photograph test's threshold, and the
storage settings. The builder (`objectstyles`) applies them; the README writer describes them."""

from __future__ import annotations

NAME = "ObjectStyles"
DOMAINS: tuple[str, ...] = ("clipart", "lineart", "photo", "render3d")  # sorted: environments 0..3
DEFAULT_RESOLUTION = 128
MIN_PER_CLASS = 6  # fewer images of a class in any domain: the class is dropped everywhere
JPEG_QUALITY = 90  # every domain stored alike; 8 MB in all at 128 px (1,794 images), 19 MB at 256
FORMAT_VERSION = 3  # 2: several vendors per emoji domain, files `<code point>.<vendor>.jpg`;
# 3: near-duplicates renamed into one object, `<group>.<stem>.jpg` (`objectstyles_dedup`)
# `files_sha256` of a default build (128 px, MIN_PER_CLASS) from the pinned packages with
# requirements.txt's Pillow / resvg-py / fonts: the builder refuses any other result.
EXPECTED_FILES_SHA256 = "7cd12cb9c87fdcbbcb10fd77191f2f11d5f97512030ac7c3fe6c6473909e50ed"
# Stored sizes registered beside the default, each as the benchmark `ObjectStyles@<px>` in its own
# folder: 128 px trained at 96 suits a CPU, but EfficientNet-Lite0/1/2 were pretrained at 224 / 240 /
# 260 px, and a backbone is only judged at its own resolution from images stored at least that large
# (256 covers 224 and 240; 260 is a 1.6% upsampling, and Fluent 3D's sources are 256 px WebP anyway).
VARIANT_RESOLUTIONS: tuple[int, ...] = (256,)
# `files_sha256` of every registered size built from the pinned packages (MIN_PER_CLASS, requirements.txt's
# drawing libraries); the builder refuses any other result for these sizes. Another size has no pin.
EXPECTED_FILES_SHA256_AT: dict[int, str] = {
    DEFAULT_RESOLUTION: EXPECTED_FILES_SHA256,
    256: "889a9b746a16a4a047bf92f9f9716f451b48d57f312d1a81a03e2e88a3e260b9",
}

# A photograph's neighbouring pixels are almost never exactly equal (sensor noise, texture);
# a drawing's flat fills make most of them equal. Measured on tuxpaint's `cartoon/` folders
# (drawings by the package's own label): 95% of them have >= 0.2 equal neighbours; the animal
# photographs mostly < 0.05. 0.1 sits between.
PHOTO_MAX_EQUAL_NEIGHBOURS = 0.10

# Source categories -> classes. Folder prefixes (longest match wins; None excludes).
TUXPAINT_FOLDERS: dict[str, str | None] = {
    "animals/mammals": "mammal", "animals/marsupials": "mammal", "animals/mammals/aquatic": "sea_animal",
    "animals/birds": "bird", "animals/fish": "sea_animal", "animals/shellfish": "sea_animal",
    "animals/insects": "insect", "food/fruit": "fruit", "food/vegetables": "vegetable",
    "plants": "plant", "hobbies/music": "musical_instrument", "household/tools": "tool",
    "sports": "sport", "vehicles": "vehicle", "military/vehicles": "vehicle",
}
TUXPAINT_EXCLUDED_FOLDERS = ("cartoon", "toys")  # drawings and toy photographs, by the package's labels
OPENCLIPART_FOLDERS: dict[str, str | None] = {
    "animals/mammals": "mammal", "animals/birds": "bird", "animals/fish": "sea_animal",
    "animals/bugs": "insect", "food/fruit": "fruit", "food/vegetables": "vegetable", "plants": "plant",
    "transportation/vehicles": "vehicle", "transportation/boating": "vehicle",
    "recreation/music": "musical_instrument", "recreation/sports": "sport",
    "tools": "tool", "tools/weapons": None, "tools/toys": None,
}
EMOJI_SUBGROUPS: dict[str, str] = {
    "animal-mammal": "mammal", "animal-bird": "bird", "animal-marine": "sea_animal", "animal-bug": "insect",
    "food-marine": "sea_animal",
    "food-fruit": "fruit", "food-vegetable": "vegetable", "plant-flower": "plant", "plant-other": "plant",
    "transport-ground": "vehicle", "transport-water": "vehicle", "transport-air": "vehicle",
    "musical-instrument": "musical_instrument", "tool": "tool", "sport": "sport",
}
CANDIDATE_CLASSES: tuple[str, ...] = tuple(sorted(set(EMOJI_SUBGROUPS.values())))
EMOJI_DOMAINS = ("lineart", "render3d")
# The vendors pooled in each emoji domain (keys of `_emoji_drawers`), in file-name order.
EMOJI_VENDORS: dict[str, tuple[str, ...]] = {"lineart": ("emojione", "fluenthc", "noto"),
                                              "render3d": ("fluent3d", "notocolor", "twemoji")}
SVG_SCALE = 2  # SVGs are drawn at twice the output size, then fitted like every other image


def variant_name(resolution: int) -> str:
    """The benchmark (and folder) name of a stored size: `ObjectStyles` at 128 px, `ObjectStyles@256`."""
    return NAME if resolution == DEFAULT_RESOLUTION else f"{NAME}@{resolution}"
