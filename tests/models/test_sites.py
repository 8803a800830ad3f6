"""sites.resolve_sites: jaxcl suffixes (the semantics of the former methods.lora_bank.select_sites)
and PEFT target_modules names, for the Llama family and T5 (v1.0 and gated v1.1)."""
from __future__ import annotations

import pytest
from flax import nnx

from jaxcl.models import Llama, LlamaConfig, sites, t5

LLAMA = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=4)
T5_SIZES = dict(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=3, num_heads=2)


def _site_shapes(make):
    return nnx.eval_shape(make).site_shapes()  # abstract model: no weights are initialised


@pytest.fixture(scope="module")
def llama_sites():
    return _site_shapes(lambda: Llama(LLAMA, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def t5_sites(request):
    config = t5.T5Config(**T5_SIZES, feed_forward_proj=request.param)
    return _site_shapes(lambda: t5.T5(config, rngs=nnx.Rngs(0)))


def _suffix_rule(site_shapes, patterns):
    """The select_sites rule, restated: every site whose name ends with some pattern."""
    return sorted(name for name in site_shapes if any(name.endswith(p) for p in patterns))


@pytest.mark.parametrize("patterns, expected", [
    (["q_proj", "v_proj"], ["attn.q", "attn.v"]),
    (["gate_proj", "up_proj", "down_proj"], ["mlp.down", "mlp.gate", "mlp.up"]),
    (["o_proj", "mlp.down"], ["attn.o", "mlp.down"]),  # PEFT names and jaxcl suffixes mixed
    (["attn.k", "k_proj"], ["attn.k"]),
])
def test_llama_peft_names(llama_sites, patterns, expected):
    assert sites.resolve_sites(llama_sites, patterns) == expected
    assert sites.resolve_sites(llama_sites, patterns, Llama.peft_names) == expected
    assert sites.resolve_sites(llama_sites, list(Llama.peft_names)) == sorted(llama_sites)


def test_t5_peft_names(t5_sites):
    attention = ("encoder.self_attn", "decoder.self_attn", "decoder.cross_attn")
    assert sites.resolve_sites(t5_sites, ["q", "v"]) == sorted(f"{a}.{p}" for a in attention for p in "qv")
    # PEFT's "o" is the attention output only; as a bare suffix it would also match mlp.wo
    assert sites.resolve_sites(t5_sites, ["o"]) == sorted(f"{a}.o" for a in attention)
    assert sites.resolve_sites(t5_sites, ["wo"]) == ["decoder.mlp.wo", "encoder.mlp.wo"]
    wi = ["wi_0", "wi_1"] if "encoder.mlp.wi_0" in t5_sites else ["wi"]
    assert sites.resolve_sites(t5_sites, wi) == sorted(f"{s}.mlp.{w}" for s in ("decoder", "encoder") for w in wi)
    assert sites.resolve_sites(t5_sites, list(t5.T5.peft_names)[:4] + wi + ["wo"]) == sorted(t5_sites)


@pytest.mark.parametrize("patterns", [["attn.q"], ["self_attn.q", "mlp.wo"], ["cross_attn.k", "encoder.mlp.wo"],
                                      ["decoder.self_attn.v", "attn.o"], []])
def test_suffixes_keep_the_select_sites_semantics(t5_sites, patterns):
    assert sites.resolve_sites(t5_sites, patterns) == _suffix_rule(t5_sites, patterns)


def test_unmatched_and_malformed_patterns(llama_sites, t5_sites):
    with pytest.raises(ValueError, match=r"method sites \['wo', 'mlp.wi'\] match no site of this model; "
                                         r"it has \['attn.k', 'attn.o'"):
        sites.resolve_sites(llama_sites, ["q_proj", "wo", "mlp.wi"])
    with pytest.raises(ValueError, match=r"method sites \['gate_proj'\] match no site"):
        sites.resolve_sites(t5_sites, ["q", "gate_proj"])
    with pytest.raises(ValueError, match="list of names, got the string 'attn.q'"):
        sites.resolve_sites(llama_sites, "attn.q")
