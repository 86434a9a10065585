"""Dataset presets: number of classes, ignore value, class names and the raw-value-to-class table.

A preset describes how a *raw* ground-truth pixel value becomes a class id 0..num_classes-1 or is ignored:

- ``voc``          PASCAL VOC 2012: 21 classes (0 = background), 255 = void (ignored).
- ``camvid``       CamVid, SegNet's 11 classes, 11 = unlabelled (ignored).
- ``cityscapes27`` Cityscapes ``*_gtFine_labelIds.png``: class = labelId - 7 for labelIds 7..33 (27 classes);
                   labelIds 0..6 (void) and anything else are ignored. This is STEGO's evaluation
                   (``target - first_nonvoid`` with ``first_nonvoid = 7``, negatives ignored).
- ``cocostuff27``  COCO-Stuff 164k ``stuffthingmaps`` (fine ids 0..181, 255 = unlabelled) mapped to the 27 coarse
                   classes (12 thing + 15 stuff supercategories) used by STEGO, PiCIE and IIC; anything else ignored.

The COCO-Stuff table below is written out by coarse class. It reproduces the ``fine_to_coarse`` dictionary of
STEGO's ``src/data.py`` (class ``Coco``; github.com/mhamilton723/STEGO), which follows the supercategory
hierarchy of COCO-Stuff (github.com/nightrome/cocostuff, ``labels.txt``). Coarse ids keep STEGO's order:
indoor then outdoor things (0-11), indoor then outdoor stuff (12-26).

Stuff and things (what to give ``segcli segment --k K --stuff N``; ``Preset.segment_args``):

- ``voc``: 21 classes, ``--stuff 0``: the benchmark's own convention, one background class and 20 objects.
- ``camvid``: 8 stuff (sky, building, pole, road, pavement, tree, sign_symbol, fence), 3 things (car,
  pedestrian, bicyclist): ``--k 11 --stuff 8``. Poles and signs count as stuff as in Cityscapes' panoptic
  definition (classes without instances).
- ``cityscapes27``: 17 stuff, 10 things (person, rider, car, truck, bus, caravan, trailer, train, motorcycle,
  bicycle: Cityscapes' classes with instances): ``--k 27 --stuff 17``.
- ``cocostuff27``: 15 stuff, 12 things (COCO-Stuff's own split of its supercategories): ``--k 27 --stuff 15``.

segcli numbers stuff first (ids 0..N-1, things N..k-1); the Hungarian matching of ``evaluate`` does not
depend on the order of the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip

# Cityscapes labelIds 7..33, in order (class id = labelId - 7).
CITYSCAPES27_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_FIRST_NONVOID = 7

# (coarse name, fine COCO-Stuff ids (0-based stuffthingmaps values) that map to it); list index = coarse id.
COCOSTUFF27_GROUPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("electronic", tuple(range(71, 77))),  # tv, laptop, mouse, remote, keyboard, cell phone
    ("appliance", tuple(range(77, 83))),  # microwave, oven, toaster, sink, refrigerator (+ unused 82)
    ("food-things", tuple(range(51, 61))),  # banana ... cake
    ("furniture-things", tuple(range(61, 71))),  # chair, couch, potted plant, bed, ..., toilet, door
    ("indoor", tuple(range(83, 91))),  # book, clock, vase, scissors, teddy bear, hair drier, toothbrush, ...
    ("kitchen", tuple(range(43, 51))),  # bottle, plate, wine glass, cup, fork, knife, spoon, bowl
    ("accessory", tuple(range(25, 33))),  # hat, backpack, umbrella, shoe, eye glasses, handbag, tie, suitcase
    ("animal", tuple(range(15, 25))),  # bird ... giraffe
    ("outdoor", tuple(range(9, 15))),  # traffic light, fire hydrant, street sign, stop sign, parking meter, bench
    ("person", (0,)),
    ("sports", tuple(range(33, 43))),  # frisbee ... tennis racket
    ("vehicle", tuple(range(1, 9))),  # bicycle, car, motorcycle, airplane, bus, train, truck, boat
    ("ceiling", (101, 102)),
    ("floor", (100, 113, 114, 115, 116, 117)),  # carpet, floor-*
    ("food-stuff", (120, 121, 152, 169)),  # food-other, fruit, salad, vegetable
    ("furniture-stuff", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("raw-material", (99, 131, 138, 142)),  # cardboard, metal, paper, plastic
    ("textile", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall", tuple(range(170, 177))),  # wall-brick ... wall-wood
    ("window", (179, 180)),  # window-blind, window-other
    ("building", (94, 95, 127, 150, 157, 165)),  # bridge, building-other, house, roof, skyscraper, tent
    ("ground", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky", (105, 156)),  # clouds, sky-other
    ("solid", (126, 134, 149, 159, 161, 181)),  # hill, mountain, rock, solid-other, stone, wood
    ("structural", (98, 112, 137, 145, 163)),  # cage, fence, net, railing, structural-other
    ("water", (119, 147, 154, 177, 178)),  # fog, river, sea, water-other, waterdrops
)


@dataclass(frozen=True)
class Preset:
    name: str
    class_names: tuple[str, ...]
    ignore: int  # the raw value documented as "ignore" (other unmapped raw values are ignored too if remapped)
    raw_to_class: tuple[tuple[int, int], ...] | None  # None: raw value = class id
    output_palette: str  # palette used for --remap-out pictures
    stuff: tuple[int, ...] = ()  # class ids that are stuff (labelled by `segment --stuff N`); the rest are things

    @property
    def n_stuff(self) -> int:
        return len(self.stuff)

    @property
    def segment_args(self) -> tuple[str, ...]:
        """The `segcli segment` / `cluster-dataset` options that match this dataset's classes."""
        return ("--k", str(self.num_classes), "--stuff", str(self.n_stuff))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _cityscapes_table() -> tuple[tuple[int, int], ...]:
    n = len(CITYSCAPES27_CLASSES)
    return tuple((CITYSCAPES_FIRST_NONVOID + k, k) for k in range(n))


def _cocostuff_table() -> tuple[tuple[int, int], ...]:
    pairs = [(fine, coarse) for coarse, (_, fines) in enumerate(COCOSTUFF27_GROUPS) for fine in fines]
    return tuple(sorted(pairs))


PRESETS: dict[str, Preset] = {
    "voc": Preset("voc", VOC_CLASSES, 255, None, "voc"),
    "camvid": Preset("camvid", CAMVID_CLASSES, 11, None, "camvid", stuff=tuple(range(8))),
    "cityscapes27": Preset(
        "cityscapes27", CITYSCAPES27_CLASSES, 255, _cityscapes_table(), "cityscapes27", stuff=tuple(range(17))
    ),
    "cocostuff27": Preset(
        "cocostuff27", tuple(name for name, _ in COCOSTUFF27_GROUPS), 255, _cocostuff_table(), "voc",
        stuff=tuple(range(12, 27)),
    ),
}
