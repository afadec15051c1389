"""Synthetic COCO person-keypoints dataset: rendered articulated people with real occlusion labels.

Why it exists: the tests and the CPU training of the embedded default model need a dataset that
needs no download, is deterministic for a seed and still looks enough like people that a pose
network learns something transferable (joint appearance, left/right from the face, occlusion).

How a scene is made:

* a 3D skeleton (pelvis root, two-segment spine, neck, head with face points, arms with hands, legs
  with feet) with human proportions (fractions of body height), posed by joint angles that are
  clipped to anatomical limits (knees and elbows bend one way, hips and shoulders stay in plausible
  ranges) and sampled from pose families (standing, walking, running, arms raised, sitting,
  crouching, kneeling, bending, free);
* the body is a set of tapered capsules (spheres for the head and face details) that are ray-cast
  as impostors into a z-buffer with per-pixel depth and normals, shaded with a directional light,
  anti-aliased at the edges, in skin, hair, shirt, trousers and shoe colours;
* a pinhole camera with random field of view, pitch and roll projects everything; people are
  placed at depths that give heights from ~8 % to ~130 % of the image;
* each joint's label comes from the rendered buffers: ``v=0`` when it projects outside the image
  (COCO then stores x = y = 0), ``v=1`` when the pixel under it is owned by another person, a prop
  or a part of its own body that lies clearly in front of it (self-occlusion in side and back
  views), ``v=2`` otherwise.

People whose silhouette has no pixel in the image are not annotated; people that are visible but
have no labelled joint are annotated with ``num_keypoints`` 0, as COCO does. So are people whose
silhouette covers fewer than ``MIN_KEYPOINT_AREA`` pixels (32 x 32, COCO's "small"): COCO leaves
such people without keypoints, and a joint label on a 10-pixel figure is noise for training and
an unreachable target for evaluation.

Every image draws from its own ``numpy`` generator seeded with ``(seed, index)``, so the output is
byte-identical for a seed whatever the number of worker processes.
"""

# One module per job: pose (joint angles and pose families), camera (projection and rotations),
# body (appearance and the posed capsule body), render (rasterisation and joint labels),
# background (backgrounds and global lighting), scene (random scenes), dataset (the COCO image
# dataset writer), sequences (video sequences with track ids) and cli (the ``synth`` command).
# This package re-exports their public names, so callers import from omnipose.training.synth.

from omnipose.training.synth.background import apply_global_lighting, render_background
from omnipose.training.synth.body import (
    EYE_COLOUR,
    HAIR_COLOURS,
    MIN_LIMB_RADIUS_PX,
    SKIN_TONES,
    Appearance,
    Person,
    Primitive,
    TorsoShading,
    make_person,
)
from omnipose.training.synth.camera import Camera
from omnipose.training.synth.cli import add_synth_parser, main
from omnipose.training.synth.dataset import (
    JPEG_QUALITY,
    MIN_KEYPOINT_AREA,
    coco_categories,
    generate_dataset,
    image_rng,
    synthesize_image,
)
from omnipose.training.synth.pose import (
    AXIAL_ANGLES,
    JOINT_LIMITS_DEG,
    L_ANKLE,
    L_EAR,
    L_ELBOW,
    L_EYE,
    L_HIP,
    L_KNEE,
    L_SHOULDER,
    L_WRIST,
    LIMB_ANGLES,
    NOSE,
    NUM_JOINTS,
    POSE_FAMILIES,
    POSE_FAMILY_WEIGHTS,
    R_ANKLE,
    R_EAR,
    R_ELBOW,
    R_EYE,
    R_HIP,
    R_KNEE,
    R_SHOULDER,
    R_WRIST,
    VIEW_WEIGHTS,
    VIEWS,
    Pose,
    sample_pose,
)
from omnipose.training.synth.render import (
    BACKGROUND_ID,
    NEAR_PLANE_M,
    PROP_ID,
    Light,
    SceneRender,
    render_scene,
)
from omnipose.training.synth.scene import SceneOptions, sample_person, sample_scene
from omnipose.training.synth.sequences import (
    CROSSING_IOU,
    SEQUENCE_FPS,
    SEQUENCE_KINDS,
    Walker,
    crossing_tracks,
    generate_sequence,
    generate_sequences,
    sample_walkers,
    synthesize_sequence,
)

__all__ = [
    "AXIAL_ANGLES",
    "BACKGROUND_ID",
    "CROSSING_IOU",
    "EYE_COLOUR",
    "HAIR_COLOURS",
    "JOINT_LIMITS_DEG",
    "JPEG_QUALITY",
    "LIMB_ANGLES",
    "L_ANKLE",
    "L_EAR",
    "L_ELBOW",
    "L_EYE",
    "L_HIP",
    "L_KNEE",
    "L_SHOULDER",
    "L_WRIST",
    "MIN_KEYPOINT_AREA",
    "MIN_LIMB_RADIUS_PX",
    "NEAR_PLANE_M",
    "NOSE",
    "NUM_JOINTS",
    "POSE_FAMILIES",
    "POSE_FAMILY_WEIGHTS",
    "PROP_ID",
    "R_ANKLE",
    "R_EAR",
    "R_ELBOW",
    "R_EYE",
    "R_HIP",
    "R_KNEE",
    "R_SHOULDER",
    "R_WRIST",
    "SEQUENCE_FPS",
    "SEQUENCE_KINDS",
    "SKIN_TONES",
    "VIEWS",
    "VIEW_WEIGHTS",
    "Appearance",
    "Camera",
    "Light",
    "Person",
    "Pose",
    "Primitive",
    "SceneOptions",
    "SceneRender",
    "TorsoShading",
    "Walker",
    "add_synth_parser",
    "apply_global_lighting",
    "coco_categories",
    "crossing_tracks",
    "generate_dataset",
    "generate_sequence",
    "generate_sequences",
    "image_rng",
    "main",
    "make_person",
    "render_background",
    "render_scene",
    "sample_person",
    "sample_pose",
    "sample_scene",
    "sample_walkers",
    "synthesize_image",
    "synthesize_sequence",
]
