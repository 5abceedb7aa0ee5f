"""The toy world: procedural 64x64 images with known ground truth, the toy base-model recipe, the judges.

Public API (lazy, so `import dcustom.toyworld` stays torch-free):

    render_attributes("star", "red", "striped")          # explicit attributes -> PIL image
    render_caption("a scarlet disc on a dotted background", seed=0)
    render_scene(scene, with_mask=False)                 # a grammar.Scene -> PIL image (+ object mask)
    render_samples(n, seed, split="base")                # [(image, caption, scene)], reproducible
    render_subject("robot", n, seed)                     # held-out subject in many poses / backgrounds
    render_style("mosaic", n, seed)                      # held-out style
    load_judge("train" | "eval")                         # Judge: predict(images), features(images), forward(x)
    subject_similarity(a, b), toy_fid(a, b), diversity(groups)
    evaluate_pipeline(pipe, prompts=None, seeds=None, judge="eval", ...) -> dict
    heldout_prompts()                                    # the fixed evaluation prompts
"""

_LAZY = {
    "render_scene": "dcustom.toyworld.render:render_scene",
    "render_samples": "dcustom.toyworld.render:render_samples",
    "render_caption": "dcustom.toyworld.render:render_caption",
    "render_attributes": "dcustom.toyworld.render:render_attributes",
    "render_subject": "dcustom.toyworld.render:render_subject",
    "render_style": "dcustom.toyworld.render:render_style",
    "grid": "dcustom.toyworld.render:grid",
    "load_judge": "dcustom.toyworld.judges:load_judge",
    "subject_similarity": "dcustom.toyworld.metrics:subject_similarity",
    "toy_fid": "dcustom.toyworld.metrics:toy_fid",
    "diversity": "dcustom.toyworld.metrics:diversity",
    "evaluate_pipeline": "dcustom.toyworld.evaluate:evaluate_pipeline",
    "heldout_prompts": "dcustom.toyworld.evaluate:heldout_prompts",
    "ToyBaseConfig": "dcustom.toyworld.config:ToyBaseConfig",
}

from dcustom.toyworld.grammar import (  # noqa: E402  (torch-free, numpy-free)
    BACKGROUNDS,
    COLOURS,
    ERASURE_CONCEPT,
    HEADS,
    HELDOUT_COMBOS,
    SHAPES,
    STYLES,
    SUBJECTS,
    Scene,
    caption,
    parse_caption,
    sample_scene,
    scene_for,
)

from dcustom.lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
