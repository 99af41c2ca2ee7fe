"""The work of each pipeline stage, re-exported for the CLI, `clipshield evaluate` and the tests.

Each stage's work lives in its own module, clipshield.work.<stage> (shared code in work.common and, for the
training stages, work.train); a stage script (stages/*.py) imports only its own, so that DVC, which reruns a stage
when a module it imports changes (`clipshield deps`), reruns only the stages a change can affect.
"""
from .work.backdoor import AttackDidNotTake, backdoor, check_backdoor  # noqa: F401
from .work.baseline import baseline  # noqa: F401
from .work.clean import MANIFEST, check_clean_source, clean, poison_evidence  # noqa: F401
from .work.common import code_version, data_hash, device, load_test, parent_model, write_metrics  # noqa: F401
from .work.data import make_data, world_samples  # noqa: F401
from .work.harden import harden  # noqa: F401
from .work.poison import poison  # noqa: F401
from .work.pretrain import pretrain  # noqa: F401
from .work.robust import robust_baseline  # noqa: F401
from .work.train import (check_image_size, code_digest, during_training, finish_model, model_provenance,  # noqa: F401
                         run_fingerprint, run_training, train_config, train_model, weights_digest)
