"""The paper's benchmarks (DomainBed's VLCS, PACS, OfficeHome, TerraIncognita) and DomainNet.

Folder names, class lists and sources follow facebookresearch/DomainBed (`domainbed/datasets.py`,
`domainbed/scripts/download.py`), so a data folder prepared by DomainBed loads here unchanged
(`VLCS/`, `PACS/`, `office_home/`, `terra_incognita/`, `domain_net/`) and the reverse.

Sources (the URLs DomainBed's download script uses; `python -m vldlib data list` prints them):

- VLCS: Google Drive file 1skwblH1_okBwxWxmRsp9_qi15hyPpxg8, `VLCS.tar.gz`, holding
  `VLCS/{Caltech101,LabelMe,SUN09,VOC2007}/<class>/`. Original: Ghifary et al.'s page
  http://www.eecs.qmul.ac.uk/~dl307/project_iccv2017 (now gone).
- PACS: Google Drive file 1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd, `PACS.zip`, holding
  `kfold/{art_painting,cartoon,photo,sketch}/<class>/` (DomainBed renames `kfold` to `PACS`).
- OfficeHome: Google Drive file 1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC, `office_home.zip`, holding
  `OfficeHomeDataset_10072016/{Art,Clipart,Product,Real World}/<class>/` (note the space).
  Original: http://hemanthdv.org/OfficeHome-Dataset/.
- TerraIncognita: built from Caltech Camera Traps on LILA (https://lila.science/datasets/caltech-camera-traps):
  the CCT-20 images `eccv_18_all_images_sm.tar.gz` (6.5 GB, flat folder of `<uuid>.jpg`) and the
  COCO-style labels `caltech_camera_traps.json.zip` (`caltech_images_20210113.json`). DomainBed
  keeps locations 38, 46, 100, 43 and 10 classes and writes `location_<id>/<class>/<file>`. Its URLs
  moved from vision.caltech.edu (2020) to lilablobssc.blob.core.windows.net (2021, PR #61) to
  storage.googleapis.com/public-datasets-lila (June 2024, commit 3cf2e20, issue #136); the last
  is used here. The CCT-20 split files `eccv_18_annotations.tar.gz` work as the label source too
  (pass it with `--archive`): every `.json` found in the label archive is merged.
- DomainNet: the six per-domain zips of http://ai.bu.edu/M3SDA/ at csr.bu.edu (clipart and
  painting from the `groundtruth/` folder, the cleaned versions), then DomainBed's list of
  duplicate images `domainbed/misc/domain_net_duplicates.txt` is deleted.

Expected images per domain (`counts`): PACS 9,991, VLCS 10,729, OfficeHome 15,588 and DomainNet
586,575 (after duplicate removal) are the DomainBed paper's totals, split per domain as every
DomainBed-based copy loads them. TerraIncognita has two accepted versions: the 24,788 images of
the DomainBed/SWAD/MIRO papers (per location from MIRO's authors, khanrc/miro issue #9) and the
24,330 images today's sources give (DomainBed issue #58; its per-location split was never
published, so that version is checked on the total only, under the key `TOTAL`).
No source publishes checksums, so no md5 is recorded; see `vldlib.data.download`.
"""

from __future__ import annotations

import functools

from vldlib.data.objectstyles_rules import DEFAULT_RESOLUTION, VARIANT_RESOLUTIONS, variant_name
from vldlib.data.registry import BenchmarkSpec, Source, register_benchmark

# In a `counts` version, this key holds the total image count; a version with only this key is
# matched on the total alone (TerraIncognita's 24,330-image version, whose split is unknown).
TOTAL = "total"

# Caltech Camera Traps location ids and the 10 classes DomainBed keeps (download.py).
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CLASSES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon",
                 "squirrel")

_GDRIVE = "https://drive.google.com/uc?id="
_LILA = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps"
_M3SDA = "http://csr.bu.edu/ftp/visda/2019/multi-source"
_DOMAINBED_RAW = "https://raw.githubusercontent.com/facebookresearch/DomainBed/main"

OFFICE_HOME_CLASSES = tuple("""
Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair
Clipboards Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops
Flowers Folder Fork Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker
Monitor Mop Mouse Mug Notebook Oven Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin
Radio Refrigerator Ruler Scissors Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table
Telephone ToothBrush Toys Trash_Can Webcam
""".split())

DOMAIN_NET_CLASSES = tuple("""
The_Eiffel_Tower The_Great_Wall_of_China The_Mona_Lisa aircraft_carrier airplane alarm_clock
ambulance angel animal_migration ant anvil apple arm asparagus axe backpack banana bandage barn
baseball baseball_bat basket basketball bat bathtub beach bear beard bed bee belt bench bicycle
binoculars bird birthday_cake blackberry blueberry book boomerang bottlecap bowtie bracelet
brain bread bridge broccoli broom bucket bulldozer bus bush butterfly cactus cake calculator
calendar camel camera camouflage campfire candle cannon canoe car carrot castle cat ceiling_fan
cell_phone cello chair chandelier church circle clarinet clock cloud coffee_cup compass computer
cookie cooler couch cow crab crayon crocodile crown cruise_ship cup diamond dishwasher
diving_board dog dolphin donut door dragon dresser drill drums duck dumbbell ear elbow elephant
envelope eraser eye eyeglasses face fan feather fence finger fire_hydrant fireplace firetruck
fish flamingo flashlight flip_flops floor_lamp flower flying_saucer foot fork frog frying_pan
garden garden_hose giraffe goatee golf_club grapes grass guitar hamburger hammer hand harp hat
headphones hedgehog helicopter helmet hexagon hockey_puck hockey_stick horse hospital
hot_air_balloon hot_dog hot_tub hourglass house house_plant hurricane ice_cream jacket jail
kangaroo key keyboard knee knife ladder lantern laptop leaf leg light_bulb lighter lighthouse
lightning line lion lipstick lobster lollipop mailbox map marker matches megaphone mermaid
microphone microwave monkey moon mosquito motorbike mountain mouse moustache mouth mug mushroom
nail necklace nose ocean octagon octopus onion oven owl paint_can paintbrush palm_tree panda
pants paper_clip parachute parrot passport peanut pear peas pencil penguin piano pickup_truck
picture_frame pig pillow pineapple pizza pliers police_car pond pool popsicle postcard potato
power_outlet purse rabbit raccoon radio rain rainbow rake remote_control rhinoceros rifle river
roller_coaster rollerskates sailboat sandwich saw saxophone school_bus scissors scorpion
screwdriver sea_turtle see_saw shark sheep shoe shorts shovel sink skateboard skull skyscraper
sleeping_bag smiley_face snail snake snorkel snowflake snowman soccer_ball sock speedboat spider
spoon spreadsheet square squiggle squirrel stairs star steak stereo stethoscope stitches
stop_sign stove strawberry streetlight string_bean submarine suitcase sun swan sweater swing_set
sword syringe t-shirt table teapot teddy-bear telephone television tennis_racquet tent tiger
toaster toe toilet tooth toothbrush toothpaste tornado tractor traffic_light train tree triangle
trombone truck trumpet umbrella underwear van vase violin washing_machine watermelon waterslide
whale wheel windmill wine_bottle wine_glass wristwatch yoga zebra zigzag
""".split())

VLCS = register_benchmark(BenchmarkSpec(
    name="VLCS",
    domains=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    classes=("bird", "car", "chair", "dog", "person"),
    counts={"DomainBed": {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}},
    sources=(Source(_GDRIVE + "1skwblH1_okBwxWxmRsp9_qi15hyPpxg8", "VLCS.tar.gz",
                    note="DomainBed's Google-Drive copy; tar.gz of VLCS/<domain>/<class>/"),),
    description="VLCS (Fang et al. 2013; Torralba & Efros): photos of 5 classes from 4 datasets "
                "(Caltech101, LabelMe, SUN09, VOC2007); 10,729 images.",
))

PACS = register_benchmark(BenchmarkSpec(
    name="PACS",
    domains=("art_painting", "cartoon", "photo", "sketch"),
    classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
    counts={"DomainBed": {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}},
    sources=(Source(_GDRIVE + "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd", "PACS.zip",
                    note="DomainBed's Google-Drive copy; zip of kfold/<domain>/<class>/"),),
    description="PACS (Li et al. 2017): 7 classes drawn as art paintings, cartoons, photos and "
                "sketches; 9,991 images.",
))

OFFICE_HOME = register_benchmark(BenchmarkSpec(
    name="OfficeHome",
    domains=("Art", "Clipart", "Product", "Real World"),
    classes=OFFICE_HOME_CLASSES,
    counts={"DomainBed": {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357}},
    sources=(Source(_GDRIVE + "1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC", "office_home.zip",
                    note="DomainBed's Google-Drive copy; zip of OfficeHomeDataset_10072016/<domain>/<class>/"),),
    folder="office_home",
    description="Office-Home (Venkateswara et al. 2017): 65 office and home objects as art, clipart, "
                "product photos and real-world photos; 15,588 images.",
))

# Hugging Face Hub copies of the DomainBed benchmarks (Flower Labs), used with `--source hf` and
# when the primary (Google-Drive) link fails; `vldlib.data.hub` converts them to the DomainBed
# layout. Published schema (dataset card of flwrlabs/pacs): parquet shards `data/train-*.parquet`
# with columns `image` (image: {bytes, path}), `domain` (string, e.g. 'art_painting') and
# `label` (class label dog..person); 9,991 rows. flwrlabs/office-home is taken to follow the same
# schema (image, domain, label; 15,588 rows); its card could not be checked from here.
HUB_DATASETS = {"PACS": "flwrlabs/pacs", "OfficeHome": "flwrlabs/office-home"}

TERRA_INCOGNITA = register_benchmark(BenchmarkSpec(
    name="TerraIncognita",
    domains=("location_100", "location_38", "location_43", "location_46"),
    classes=TERRA_CLASSES,
    counts={
        "papers (24,788)": {"location_100": 4879, "location_38": 9767, "location_43": 4020,
                            "location_46": 6122, TOTAL: 24788},
        "today's sources (24,330)": {TOTAL: 24330},
    },
    sources=(
        Source(f"{_LILA}/eccv_18_all_images_sm.tar.gz", "eccv_18_all_images_sm.tar.gz", kind="terra_images",
               note="CCT-20 images, 6.5 GB, flat folder eccv_18_all_images_sm/<uuid>.jpg"),
        Source(f"{_LILA}/labels/caltech_camera_traps.json.zip", "caltech_camera_traps.json.zip",
               kind="terra_annotations", note="COCO-style labels caltech_images_20210113.json (location, category)"),
    ),
    folder="terra_incognita",
    description="TerraIncognita (Beery et al. 2018): camera-trap photos of 10 classes (9 animals and "
                "'empty') at 4 Caltech Camera Traps locations; 24,788 images in the papers, 24,330 "
                "from today's sources.",
))

DOMAIN_NET = register_benchmark(BenchmarkSpec(
    name="DomainNet",
    domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    classes=DOMAIN_NET_CLASSES,
    counts={"DomainBed": {"clipart": 48129, "infograph": 51605, "painting": 72266, "quickdraw": 172500,
                          "real": 172947, "sketch": 69128}},
    sources=(
        Source(f"{_M3SDA}/groundtruth/clipart.zip", "clipart.zip"),
        Source(f"{_M3SDA}/infograph.zip", "infograph.zip"),
        Source(f"{_M3SDA}/groundtruth/painting.zip", "painting.zip"),
        Source(f"{_M3SDA}/quickdraw.zip", "quickdraw.zip"),
        Source(f"{_M3SDA}/real.zip", "real.zip"),
        Source(f"{_M3SDA}/sketch.zip", "sketch.zip"),
        Source(f"{_DOMAINBED_RAW}/domainbed/misc/domain_net_duplicates.txt", "domain_net_duplicates.txt",
               kind="remove_list", note="DomainBed's list of duplicate images, deleted after extraction"),
    ),
    folder="domain_net",
    description="DomainNet (Peng et al. 2019): 345 classes in 6 styles; 586,575 images after "
                "DomainBed's duplicate removal. The paper trains it for 30,000 steps.",
    n_steps=30_000,
    checkpoint_freq=1000,
))


def _build_objectstyles(data_dir, **kwargs):
    # imported when asked: the builder pulls in the renderers and the package fetcher
    from vldlib.data.objectstyles import build_objectstyles

    return build_objectstyles(data_dir, **kwargs)


def _objectstyles_spec(resolution: int) -> BenchmarkSpec:
    """ObjectStyles stored at `resolution` px, under its own name and folder (`variant_name`): the
    same sources, rules, classes and split rule; only the pixels differ. A run's identity holds the
    benchmark name, so runs on two stored sizes are never mistaken for one another."""
    name = variant_name(resolution)
    size = "" if resolution == DEFAULT_RESOLUTION else f" Stored at {resolution} px (the default: {DEFAULT_RESOLUTION})."
    return BenchmarkSpec(
        name=name,
        domains=("clipart", "lineart", "photo", "render3d"),
        classes=None,  # the classes every domain has enough images of; the build's README lists them
        builder=functools.partial(_build_objectstyles, resolution=resolution, name=name),
        group_by_object=True,  # an emoji's renderings by several vendors stay on one side of the split
        description="Offline, PACS-shaped: animals, food, plants, tools, vehicles ... as clipart (Debian "
                    "openclipart-png), line art (Noto Emoji font, Fluent Emoji High Contrast, EmojiOne monotone), "
                    "photographs (Debian tuxpaint-stamps-default) and 3D / colour-cartoon emoji (npm "
                    "@lobehub/fluent-emoji-3d, Noto colour, Twemoji); no object in two domains. Built from registry "
                    f"packages by `python -m vldlib data build {name}`.{size}",
    )


OBJECT_STYLES = register_benchmark(_objectstyles_spec(DEFAULT_RESOLUTION))

def stored_for(benchmark: str, resolution: int) -> str:
    """The benchmark to train at `resolution` px: for ObjectStyles (at any stored size), the smallest
    registered stored size at least `resolution` (`ObjectStyles` for 96, `ObjectStyles@256` for 224 or
    240), or the largest when none is (260 px from 256: a 2% upscale, not 128 px blown up twice);
    any other benchmark unchanged (it keeps its original images). A study with a resolution axis
    names one benchmark and trains each resolution on images stored at least that large.

    >>> stored_for("ObjectStyles", 96), stored_for("ObjectStyles", 224), stored_for("PACS", 224)
    ('ObjectStyles', 'ObjectStyles@256', 'PACS')
    """
    sizes = sorted((DEFAULT_RESOLUTION, *VARIANT_RESOLUTIONS))
    if benchmark not in {variant_name(s) for s in sizes}:
        return benchmark
    return variant_name(next((s for s in sizes if s >= int(resolution)), sizes[-1]))

OBJECT_STYLES_VARIANTS = {px: register_benchmark(_objectstyles_spec(px)) for px in VARIANT_RESOLUTIONS}
