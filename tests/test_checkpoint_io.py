"""Reading and writing Flax parameter trees from/to checkpoint files (flax_finetune.modeling.checkpoint_io).

The parity tests take Transformers 4.x's Flax classes (and, where torch is installed, its PyTorch
classes) as the reference for names and layouts; the others build small trees by hand and run
with any Transformers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest
from flax.serialization import to_bytes
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from conftest import skip_where_the_reference_is_broken
from flax_finetune.errors import InputError
from flax_finetune.modeling.checkpoint_io import (
    PYTORCH_NAME,
    flax_to_pytorch,
    pytorch_key,
    read_params,
    write_safetensors,
)

# Most XLA optimisations off: the programs here are tiny and run once each.
pytestmark = pytest.mark.usefixtures("parity_settings")

# ---------------------------------------------------------------------------------------------
# Parity with Transformers' classes, on tiny random configs
# ---------------------------------------------------------------------------------------------

TEXT = dict(vocab_size=99, max_position_embeddings=64, pad_token_id=0)
CONFIGS = {
    "bert": dict(TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=2),
    "roberta": dict(
        TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=2,
        pad_token_id=1,
    ),
    "distilbert": dict(TEXT, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=2),
    "gpt2": dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "t5": dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "whisper": dict(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
        max_source_positions=16, max_target_positions=20, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=4, suppress_tokens=[], begin_suppress_tokens=[],
    ),
}


@dataclass(frozen=True)
class Case:
    """One architecture and head: the Transformers 4.x Flax class and its tiny config."""

    name: str
    flax_class: str
    model_type: str
    overrides: dict = field(default_factory=dict)
    transformers_flax_converts: bool = True  # whether Transformers' own PyTorch->Flax conversion handles it

    @property
    def pytorch_class(self) -> str:
        return self.flax_class.removeprefix("Flax")

    def config(self, transformers):
        return transformers.AutoConfig.for_model(self.model_type, **{**CONFIGS[self.model_type], **self.overrides})


CASES = [
    Case("bert-base", "FlaxBertModel", "bert"),
    Case("bert-sequence-classification", "FlaxBertForSequenceClassification", "bert"),
    Case("bert-token-classification", "FlaxBertForTokenClassification", "bert"),
    Case("bert-question-answering", "FlaxBertForQuestionAnswering", "bert"),
    Case("bert-masked-lm", "FlaxBertForMaskedLM", "bert"),
    Case("roberta-sequence-classification", "FlaxRobertaForSequenceClassification", "roberta"),
    Case("roberta-masked-lm", "FlaxRobertaForMaskedLM", "roberta"),
    Case("distilbert-sequence-classification", "FlaxDistilBertForSequenceClassification", "distilbert"),
    Case("distilbert-question-answering", "FlaxDistilBertForQuestionAnswering", "distilbert"),
    Case("distilbert-masked-lm", "FlaxDistilBertForMaskedLM", "distilbert"),
    Case("gpt2-lm", "FlaxGPT2LMHeadModel", "gpt2"),
    Case("gpt2-lm-untied", "FlaxGPT2LMHeadModel", "gpt2", {"tie_word_embeddings": False}),
    Case("t5-v1.0", "FlaxT5ForConditionalGeneration", "t5"),
    Case(
        "t5-v1.1", "FlaxT5ForConditionalGeneration", "t5",
        {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    ),
    Case("whisper", "FlaxWhisperForConditionalGeneration", "whisper"),
    # Transformers 4.x converts Whisper's untied PyTorch `proj_out` to nothing (its Flax name is
    # `lm_head`), so only PyTorch is the reference here.
    Case(
        "whisper-untied", "FlaxWhisperForConditionalGeneration", "whisper", {"tie_word_embeddings": False},
        transformers_flax_converts=False,
    ),
]


def transformers_with_flax():
    """Transformers, where it still has its 4.x Flax classes; else the test is skipped."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxBertModel"):
        pytest.skip("needs Transformers 4.x Flax classes as the reference")
    return transformers


def random_like(shapes, seed: int = 0):
    """Random float32 arrays in the shapes of a tree: every parameter differs from every other."""
    rng = np.random.default_rng(seed)
    return unflatten_dict(
        {path: rng.normal(size=leaf.shape).astype(np.float32) for path, leaf in flatten_dict(shapes).items()}
    )


def assert_same_tree(actual, expected):
    actual, expected = flatten_dict(actual), flatten_dict(expected)
    assert sorted(actual) == sorted(expected)
    for path, array in expected.items():
        assert actual[path].dtype == np.float32, path
        np.testing.assert_array_equal(actual[path], array, err_msg="/".join(path))


@dataclass
class Model:
    """A case's Flax class (built without initialising), config, base-model prefix and random params."""

    case: Case
    flax_class: type
    config: object
    prefix: str
    params: dict


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def model(request) -> Model:
    transformers = transformers_with_flax()
    case = request.param
    config = case.config(transformers)
    skip_where_the_reference_is_broken(case.flax_class)
    flax_class = getattr(transformers, case.flax_class)
    shapes = flax_class(config, _do_init=False).params_shape_tree
    return Model(case, flax_class, config, flax_class.base_model_prefix, random_like(shapes))


@pytest.fixture(scope="module")
def our_folder(model, tmp_path_factory):
    """A model folder with our model.safetensors of the model's params and its config."""
    folder = tmp_path_factory.mktemp(model.case.name)
    write_safetensors(model.params, folder, model_type=model.case.model_type)
    model.config.save_pretrained(folder)
    return folder


@pytest.mark.parity
def test_transformers_flax_loads_our_safetensors_to_the_same_params(model, our_folder):
    if not model.case.transformers_flax_converts:
        pytest.skip("Transformers' own conversion does not handle this case; the PyTorch test covers it")
    loaded = model.flax_class.from_pretrained(our_folder)
    assert_same_tree(loaded.params, model.params)


@pytest.mark.parity
def test_read_params_gives_back_what_was_written(model, our_folder):
    params, missing, unexpected = read_params(our_folder, model.params, model.prefix, model.case.model_type)
    assert (missing, unexpected) == ([], [])
    assert_same_tree(params, model.params)


@pytest.mark.parity
def test_pytorch_loads_our_safetensors_completely(model, our_folder):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytorch_class = getattr(transformers, model.case.pytorch_class)
    pytorch_model, info = pytorch_class.from_pretrained(our_folder, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    state = pytorch_model.state_dict()
    for key, array in flax_to_pytorch(model.params, model.case.model_type).items():
        np.testing.assert_array_equal(state[key].numpy(), array, err_msg=key)


@pytest.mark.parity
@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one-file", "sharded"])
def test_read_params_of_transformers_flax_msgpack(model, tmp_path, max_shard_size):
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.flax_class(model.config, _do_init=False).save_pretrained(tmp_path, params=model.params, **options)
    assert (tmp_path / "flax_model.msgpack.index.json").is_file() == bool(max_shard_size)

    params, missing, unexpected = read_params(tmp_path, model.params, model.prefix, model.case.model_type)
    assert (missing, unexpected) == ([], [])
    assert_same_tree(params, model.params)


@pytest.mark.parity
def test_read_params_of_transformers_flax_safetensors(model, tmp_path):
    """Transformers 4.x Flax `save_pretrained(safe_serialization=True)` writes the Flax layout, marked "flax"."""
    model.flax_class(model.config, _do_init=False).save_pretrained(tmp_path, params=model.params, safe_serialization=True)

    params, missing, unexpected = read_params(tmp_path, model.params, model.prefix, model.case.model_type)
    assert (missing, unexpected) == ([], [])
    assert_same_tree(params, model.params)


@pytest.mark.parity
def test_base_model_from_pytorch_transformers_into_head_tree(tmp_path):
    """A PyTorch BertModel's own save_pretrained (keys without "bert.") fills a head model's "bert"."""
    pytest.importorskip("torch")
    transformers = transformers_with_flax()
    config = transformers.BertConfig(**CONFIGS["bert"])
    transformers.BertModel(config).save_pretrained(tmp_path)
    head = transformers.FlaxBertForSequenceClassification(config, _do_init=False).params_shape_tree

    params, missing, unexpected = read_params(tmp_path, head, "bert")
    assert (missing, unexpected) == ([("classifier", "bias"), ("classifier", "kernel")], [])
    reference = transformers.FlaxBertModel.from_pretrained(tmp_path).params
    assert_same_tree(params["bert"], reference)


# ---------------------------------------------------------------------------------------------
# Names and layouts, on trees built by hand
# ---------------------------------------------------------------------------------------------


class Shape:
    """A leaf of an expected tree: only its shape matters."""

    def __init__(self, *shape: int):
        self.shape = shape


def tree(**leaves: tuple[int, ...]):
    """A nested tree of `Shape`s from "a__b__c"-named keyword arguments."""
    return unflatten_dict({tuple(name.split("__")): Shape(*shape) for name, shape in leaves.items()})


BASE = dict(
    embeddings__word_embeddings__embedding=(10, 4),
    embeddings__LayerNorm__scale=(4,),
    embeddings__LayerNorm__bias=(4,),
    encoder__layer__0__attention__self__query__kernel=(4, 4),
    encoder__layer__0__attention__self__query__bias=(4,),
)
HEAD = dict(classifier__kernel=(4, 3), classifier__bias=(3,))
BERT_BASE = tree(**BASE)
BERT_HEAD = tree(**{"bert__" + name: shape for name, shape in BASE.items()}, **HEAD)


def write_flax_msgpack(params, folder):
    (folder / "flax_model.msgpack").write_bytes(to_bytes(params))


@pytest.mark.parametrize(
    "path, model_type, key",
    [
        (("bert", "embeddings", "word_embeddings", "embedding"), "bert", "bert.embeddings.word_embeddings.weight"),
        (("bert", "embeddings", "LayerNorm", "scale"), "bert", "bert.embeddings.LayerNorm.weight"),
        (("bert", "encoder", "layer", "0", "output", "dense", "kernel"), "bert", "bert.encoder.layer.0.output.dense.weight"),
        (("cls", "predictions", "bias"), "bert", "cls.predictions.bias"),
        (("roberta", "pooler", "dense", "bias"), "roberta", "roberta.pooler.dense.bias"),
        (("distilbert", "transformer", "layer", "1", "ffn", "lin1", "kernel"), "distilbert",
         "distilbert.transformer.layer.1.ffn.lin1.weight"),
        (("vocab_projector", "bias"), "distilbert", "vocab_projector.bias"),
        (("transformer", "h", "0", "attn", "c_attn", "kernel"), "gpt2", "transformer.h.0.attn.c_attn.weight"),
        (("transformer", "ln_f", "scale"), "gpt2", "transformer.ln_f.weight"),
        (("shared", "embedding"), "t5", "shared.weight"),
        (("encoder", "block", "0", "layer", "0", "SelfAttention", "relative_attention_bias", "embedding"), "t5",
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        (("decoder", "block", "1", "layer", "2", "layer_norm", "weight"), "t5",
         "decoder.block.1.layer.2.layer_norm.weight"),
        (("encoder", "block", "0", "layer", "1", "DenseReluDense", "wi_0", "kernel"), "t5",
         "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
        (("lm_head", "kernel"), "t5", "lm_head.weight"),
        (("model", "encoder", "conv1", "kernel"), "whisper", "model.encoder.conv1.weight"),
        (("model", "decoder", "embed_positions", "embedding"), "whisper", "model.decoder.embed_positions.weight"),
        (("lm_head", "kernel"), "whisper", "proj_out.weight"),
        (("lm_head", "kernel"), None, "lm_head.weight"),
    ],
)
def test_pytorch_key(path, model_type, key):
    assert pytorch_key(path, model_type) == key


def test_pytorch_layouts_of_dense_conv_and_norm(tmp_path):
    """Dense [in, out] -> [out, in]; Conv [width, in, out] -> [out, in, width]; the rest as is."""
    params = random_like(tree(
        dense__kernel=(2, 5), conv__kernel=(3, 2, 4), conv__bias=(4,), norm__scale=(5,), embed__embedding=(7, 5),
    ))
    written = flax_to_pytorch(params)
    assert sorted(written) == ["conv.bias", "conv.weight", "dense.weight", "embed.weight", "norm.weight"]
    kernel = params["conv"]["kernel"]
    for out, inp, width in np.ndindex(4, 2, 3):
        assert written["conv.weight"][out, inp, width] == kernel[width, inp, out]
    np.testing.assert_array_equal(written["dense.weight"], params["dense"]["kernel"].T)
    np.testing.assert_array_equal(written["norm.weight"], params["norm"]["scale"])
    np.testing.assert_array_equal(written["embed.weight"], params["embed"]["embedding"])

    write_safetensors(params, tmp_path)
    loaded, missing, unexpected = read_params(tmp_path, params, "base")
    assert (missing, unexpected) == ([], [])
    assert_same_tree(loaded, params)


def test_write_safetensors_marks_the_pytorch_format(tmp_path):
    from safetensors import safe_open

    path = write_safetensors(random_like(BERT_HEAD), tmp_path / "new")
    assert path == tmp_path / "new" / "model.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("classifier.weight").shape == (3, 4)


@pytest.mark.parametrize("write", [write_safetensors, write_flax_msgpack], ids=["pytorch-layout", "flax-msgpack"])
def test_base_checkpoint_into_head_tree(tmp_path, write):
    base = random_like(BERT_BASE)
    write(base, tmp_path)
    params, missing, unexpected = read_params(tmp_path, BERT_HEAD, "bert")
    assert (missing, unexpected) == ([("classifier", "bias"), ("classifier", "kernel")], [])
    assert_same_tree(params, {"bert": base})


@pytest.mark.parametrize(
    "write, head_keys",
    [(write_safetensors, ["classifier.bias", "classifier.weight"]),
     (write_flax_msgpack, ["classifier/bias", "classifier/kernel"])],
    ids=["pytorch-layout", "flax-msgpack"],
)
def test_head_checkpoint_into_base_tree(tmp_path, write, head_keys):
    head = random_like(BERT_HEAD)
    write(head, tmp_path)
    params, missing, unexpected = read_params(tmp_path, BERT_BASE, "bert")
    assert (missing, sorted(unexpected)) == ([], head_keys)
    assert_same_tree(params, head["bert"])


def test_tied_and_buffer_keys_are_skipped(tmp_path):
    """GPT-2: lm_head.weight is the token embedding and attn.bias a mask; BERT's decoder is its embedding."""
    rng = np.random.default_rng(0)
    wte = rng.normal(size=(10, 4)).astype(np.float32)
    save_file(
        {
            "transformer.wte.weight": wte,
            "lm_head.weight": wte,
            "transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 8, 8), np.float32)),
            "transformer.h.0.attn.masked_bias": np.array(-1e4, np.float32),
            "cls.predictions.bias": np.zeros(10, np.float32),
            "cls.predictions.decoder.weight": wte,
            "cls.predictions.decoder.bias": np.zeros(10, np.float32),
            "transformer.embeddings.position_ids": np.arange(8)[None],
            "cls.seq_relationship.weight": np.zeros((2, 4), np.float32),
        },
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    expected = tree(transformer__wte__embedding=(10, 4), cls__predictions__bias=(10,))
    params, missing, unexpected = read_params(tmp_path, expected, "transformer")
    assert (missing, unexpected) == ([], ["cls.seq_relationship.weight"])
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"], wte)


def test_a_tied_key_the_model_has_is_read(tmp_path):
    """An untied model (tie_word_embeddings=False) has its own lm_head: its key is read, not skipped."""
    params = random_like(tree(transformer__wte__embedding=(10, 4), lm_head__kernel=(4, 10)))
    write_safetensors(params, tmp_path)
    loaded, missing, unexpected = read_params(tmp_path, params, "transformer")
    assert (missing, unexpected) == ([], [])
    assert_same_tree(loaded, params)


def test_whisper_output_layer_is_proj_out(tmp_path):
    params = random_like(tree(model__decoder__embed_tokens__embedding=(10, 4), lm_head__kernel=(4, 10)))
    write_safetensors(params, tmp_path, model_type="whisper")
    assert sorted(flax_to_pytorch(params, "whisper")) == ["model.decoder.embed_tokens.weight", "proj_out.weight"]
    loaded, missing, unexpected = read_params(tmp_path, params, "model", model_type="whisper")
    assert (missing, unexpected) == ([], [])
    assert_same_tree(loaded, params)


def test_mismatched_shape_names_the_key_and_both_shapes(tmp_path):
    write_safetensors(random_like(BERT_HEAD), tmp_path)  # 3 labels
    two_labels = tree(**{"bert__" + name: shape for name, shape in BASE.items()}, classifier__kernel=(4, 2),
                      classifier__bias=(2,))
    with pytest.raises(InputError) as error:
        read_params(tmp_path, two_labels, "bert")
    message = str(error.value)
    assert "classifier.weight is (3, 4) in the checkpoint, (2, 4) in the model" in message
    assert "classifier.bias is (3,) in the checkpoint, (2,) in the model" in message
    assert "ignore_mismatched" in message

    params, missing, unexpected = read_params(tmp_path, two_labels, "bert", ignore_mismatched=True)
    assert (missing, unexpected) == ([("classifier", "bias"), ("classifier", "kernel")], [])
    assert sorted(params) == ["bert"]


def test_old_layer_norm_names_gamma_and_beta(tmp_path):
    gamma, beta = np.full(4, 2.0, np.float32), np.full(4, 3.0, np.float32)
    save_file({"embeddings.LayerNorm.gamma": gamma, "embeddings.LayerNorm.beta": beta}, str(tmp_path / "model.safetensors"))
    expected = tree(bert__embeddings__LayerNorm__scale=(4,), bert__embeddings__LayerNorm__bias=(4,))
    params, missing, unexpected = read_params(tmp_path, expected, "bert")
    assert (missing, unexpected) == ([], [])
    assert_same_tree(params, {"bert": {"embeddings": {"LayerNorm": {"scale": gamma, "bias": beta}}}})


def test_sharded_safetensors_and_bfloat16(tmp_path):
    params = random_like(BERT_HEAD)
    state = {key: array.astype(ml_dtypes.bfloat16) for key, array in flax_to_pytorch(params).items()}
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for index, (key, array) in enumerate(sorted(state.items())):
        shards[sorted(shards)[index % 2]][key] = array
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name), metadata={"format": "pt"})
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    loaded, missing, unexpected = read_params(tmp_path, BERT_HEAD, "bert")
    assert (missing, unexpected) == ([], [])
    rounded = unflatten_dict({
        path: array.astype(ml_dtypes.bfloat16).astype(np.float32) for path, array in flatten_dict(params).items()
    })
    assert_same_tree(loaded, rounded)


def test_a_shard_named_by_the_index_must_exist(tmp_path):
    weight_map = {"classifier.weight": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match="model-00001-of-00001.safetensors: missing, but its index names it"):
        read_params(tmp_path, BERT_HEAD, "bert")


def test_safetensors_is_preferred_to_msgpack_and_bin(tmp_path):
    preferred, other = random_like(BERT_HEAD, seed=1), random_like(BERT_HEAD, seed=2)
    write_flax_msgpack(other, tmp_path)
    (tmp_path / PYTORCH_NAME).write_bytes(b"not read")
    write_safetensors(preferred, tmp_path)
    assert_same_tree(read_params(tmp_path, BERT_HEAD, "bert").params, preferred)

    (tmp_path / "model.safetensors").unlink()
    assert_same_tree(read_params(tmp_path, BERT_HEAD, "bert").params, other)


def test_no_checkpoint_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"no checkpoint: expected model\.safetensors, flax_model\.msgpack or pytorch_model\.bin"):
        read_params(tmp_path, BERT_HEAD, "bert")


def test_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    (tmp_path / PYTORCH_NAME).write_bytes(b"a torch pickle")
    with pytest.raises(InputError) as error:
        read_params(tmp_path, BERT_HEAD, "bert")
    message = str(error.value)
    assert str(tmp_path / PYTORCH_NAME) in message
    assert "install torch" in message and "model.safetensors" in message


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_bin_with_torch(tmp_path, sharded):
    torch = pytest.importorskip("torch")
    params = random_like(BERT_HEAD)
    state = {key: torch.from_numpy(array) for key, array in flax_to_pytorch(params).items()}
    state["bert.embeddings.LayerNorm.weight"] = state["bert.embeddings.LayerNorm.weight"].to(torch.bfloat16)
    state["bert.embeddings.position_ids"] = torch.arange(8)[None]
    if sharded:
        names = {key: f"pytorch_model-0000{i % 2 + 1}-of-00002.bin" for i, key in enumerate(sorted(state))}
        for name in set(names.values()):
            torch.save({key: state[key] for key in state if names[key] == name}, tmp_path / name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": names}))
    else:
        torch.save(state, tmp_path / PYTORCH_NAME)

    loaded, missing, unexpected = read_params(tmp_path, BERT_HEAD, "bert")
    assert (missing, unexpected) == ([], [])
    norm = params["bert"]["embeddings"]["LayerNorm"]
    norm["scale"] = norm["scale"].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert_same_tree(loaded, params)
