import os
import warnings

import pytest
from support import RECIPES

warnings.filterwarnings("ignore", message=".*ccache.*")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer/data cache shared by every test of the session."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def debug_config(data_cache, tmp_path):
    from paddle_ernie5.config import load_config

    def make(*overrides):
        return load_config(
            os.path.join(RECIPES, "debug.yaml"),
            [
                f"data.cache_dir={data_cache}",
                f"train.run_dir={tmp_path / 'run'}",
                "train.visualdl=false",
                *overrides,
            ],
        )

    return make
