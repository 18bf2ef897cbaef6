"""`anomaly-worker --describe ARTIFACT`: what a producer must send to this artifact's workers."""

from __future__ import annotations

from detector.artifact import InputLayout, LoadedArtifact


def describe(artifact: LoadedArtifact) -> str:
    """The artifact's model, its D and image layout, and the entry fields for each dtype."""
    baseline = artifact.baseline
    d = baseline.input_dim
    layout = baseline.input
    source = "recorded by the trainer"
    if layout is None:
        layout = InputLayout.square_grey(d)
        source = "inferred from D, a square: the artifact is older than schema 1.7"
    if layout is None:
        shape = f"D = {d} values a row, layout not recorded (train from an N x H x W array to record it)"
    else:
        shape = (
            f"{layout.width} x {layout.height} x {layout.channels} "
            f"({'grey' if layout.channels == 1 else f'{layout.channels} channels'}), "
            f"{layout.order}, values in [{layout.value_range[0]:g}, {layout.value_range[1]:g}] ({source})"
        )
    scale = baseline.preprocessing.uint8_scale
    lines = [
        f"artifact        {artifact.path}",
        f"model_version   {baseline.model_version} (schema {baseline.schema_version})",
        f"score           {baseline.score}",
        f"threshold       {baseline.threshold.policy} = {baseline.threshold.value:.6g}",
        f"input_dim (D)   {d}",
        f"image layout    {shape}",
        f"engine          {'numpy (dense_stack.npz)' if artifact.dense_stack is not None else 'tensorflow'}",
        "",
        "entry fields (XADD to the input stream; docs/producers.md):",
        f"  image + dtype=uint8    {d} bytes, 0-255 (the model sees byte x {scale:g})",
        f"  image + dtype=float32  {4 * d} bytes, IEEE-754 little-endian, each in [0, 1]",
        f"  image + dtype=json     a flat JSON array of {d} numbers in [0, 1]",
        "  id                     optional, at most 256 bytes: echoed as the output's id, the shard key",
    ]
    return "\n".join(lines)
