"""The model layer: this project's modules behind `load` / `from_config`, in every Transformers version."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from conftest import MODELS
from flax_finetune import models
from flax_finetune.errors import InputError


ENCODERS = ["albert", "bert", "deberta-v2", "distilbert", "electra", "modernbert", "roberta", "roberta-prelayernorm",
            "roformer", "xlm-roberta"]


DECODERS = ["gemma", "gemma2", "gpt_neo", "llama", "mistral", "opt", "qwen2", "qwen3"]


def test_every_script_architecture_is_implemented():
    assert models.supported("sequence-classification") == sorted(ENCODERS + DECODERS + ["bart"])
    for task in ("token-classification", "question-answering", "masked-lm"):
        assert models.supported(task) == ENCODERS
    assert models.supported("causal-lm") == sorted(DECODERS + ["gpt2"])
    assert models.supported("seq2seq-lm") == ["bart", "marian", "mbart", "mt5", "pegasus", "t5", "umt5"]
    assert models.supported("speech-seq2seq") == ["whisper"]


def test_an_unsupported_architecture_lists_the_supported_ones():
    config = transformers.AutoConfig.for_model("xlnet")
    with pytest.raises(InputError, match="model type 'xlnet' is not supported for question-answering; "
                                         f"supported: {', '.join(ENCODERS)}$"):
        models.from_config(config, "question-answering")


def test_a_new_head_is_initialised_and_the_checkpoint_body_kept(tmp_path, package_log):
    """tiny-bert holds a masked-LM checkpoint: a 3-class classifier keeps its encoder and gets a new head."""
    config = models.load_config(str(MODELS / "tiny-bert"), num_labels=3)
    model = models.load(str(MODELS / "tiny-bert"), "sequence-classification", config=config, seed=3)
    assert "newly initialised (not in the checkpoint): bert/pooler" in package_log.text
    assert model.params["classifier"]["kernel"].shape == (config.hidden_size, 3)
    masked_lm = models.load(str(MODELS / "tiny-bert"), "masked-lm")
    np.testing.assert_array_equal(model.params["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["kernel"],
                                  masked_lm.params["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["kernel"])


def test_save_then_load_gives_the_same_params(tmp_path):
    model = models.load(str(MODELS / "tiny-gpt2"), "causal-lm")
    model.save(model.params, str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    again = models.load(str(tmp_path), "causal-lm")
    from flax.traverse_util import flatten_dict

    for path, value in flatten_dict(model.params).items():
        np.testing.assert_array_equal(flatten_dict(again.params)[path], value, err_msg="/".join(path))


def test_a_missing_local_folder_is_an_input_error():
    with pytest.raises(InputError, match="no such model folder"):
        models.load("./no/such/folder", "masked-lm")
