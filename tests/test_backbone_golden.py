"""The backbone against upstream outputs: LlamaGen's 2-D RoPE table and GPT logits, and a Hugging
Face LLaMA (1-D RoPE in the half-split layout, grouped-query attention) with cached greedy decoding."""

import torch
import torch.nn.functional as F

from mmgen_pytorch.backbone import Transformer, llamagen_positions
from mmgen_pytorch.pretrained import hf_llama_backbone_state_dict, llamagen_backbone_state_dict, load_strict


def llamagen_backbone(config):
    return Transformer(dim=config["dim"], depth=config["n_layer"], heads=config["n_head"],
                       norm_eps=config["norm_eps"], ff_multiple_of=config["multiple_of"],
                       rotary_axes=2, rotary_base=config["rope_base"], attn_backend="sdpa")


def test_llamagen_rotary_table_matches_golden(golden):
    data = golden("llamagen_c2i.pt")
    config = data["config"]
    model = llamagen_backbone(config)
    grid = int(config["block_size"] ** 0.5)
    positions, zero = llamagen_positions(grid, config["cls_token_num"])
    table = model.rotary(positions, zero).pairs()[0]
    torch.testing.assert_close(table, data["outputs"]["freqs_cis"], atol=1e-5, rtol=0)


def test_llamagen_t2i_rotary_table_has_zero_prefix(golden):
    data = golden("llamagen_t2i.pt")
    config = data["config"]
    model = llamagen_backbone(config)
    positions, zero = llamagen_positions(4, config["cls_token_num"])
    table = model.rotary(positions, zero).pairs()[0]
    torch.testing.assert_close(table, data["outputs"]["freqs_cis"], atol=1e-5, rtol=0)
    assert table[:120].abs().max() == 0


def test_zeroed_rotation_makes_prefix_query_and_key_zero():
    model = Transformer(dim=32, depth=1, heads=2, rotary_axes=2)
    positions, zero = llamagen_positions(2, prefix=3)
    table = model.rotary(positions, zero)
    q = torch.randn(1, 2, 7, 16)
    rotated = table.rotate(q)
    assert rotated[:, :, :3].abs().max() == 0
    # image tokens are rotated, which keeps each channel pair's norm
    pairs = lambda x: x.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(rotated[:, :, 3:]), pairs(q[:, :, 3:]))
    assert not torch.allclose(rotated[:, :, 4:], q[:, :, 4:])
    # the first image token (row 0, col 0) is not rotated at all
    torch.testing.assert_close(rotated[:, :, 3], q[:, :, 3])


def test_llamagen_c2i_logits_through_the_backbone(golden):
    data = golden("llamagen_c2i.pt")
    config, state, inputs, outputs = data["config"], data["state_dict"], data["inputs"], data["outputs"]
    model = llamagen_backbone(config).eval()
    load_strict(model, llamagen_backbone_state_dict(state))

    z, cond = inputs["z"], inputs["cond_idx"]
    prefix = F.embedding(cond, state["cls_embedding.embedding_table.weight"])[:, None]
    x = torch.cat((prefix, F.embedding(z[:, :-1], state["tok_embeddings.weight"])), dim=1)
    positions, zero = llamagen_positions(4, 1, batch=z.shape[0])
    positions, zero = positions[:, :-1], zero[:, :-1]  # the last image token is never an input
    logits = F.linear(model(x, positions=positions, zero_rotation=zero), state["output.weight"]).float()
    torch.testing.assert_close(logits, outputs["logits"], atol=1e-5, rtol=0)
    loss = F.cross_entropy(logits.flatten(0, 1), z.flatten())
    torch.testing.assert_close(loss, outputs["loss"], atol=1e-5, rtol=0)


def hf_llama(data):
    config = data["config"]
    model = Transformer(dim=config["hidden_size"], depth=config["num_hidden_layers"],
                        heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
                        ff_hidden=config["intermediate_size"], norm_eps=config["rms_norm_eps"],
                        rotary_base=config["rope_theta"], attn_backend="sdpa").eval()
    dim_head = config["hidden_size"] // config["num_attention_heads"]
    load_strict(model, hf_llama_backbone_state_dict(data["state_dict"], dim_head=dim_head))
    return model


def test_hf_llama_logits_through_the_backbone(golden):
    data = golden("hf_llama.pt")
    state, ids = data["state_dict"], data["inputs"]["input_ids"]
    model = hf_llama(data)
    hidden = model(F.embedding(ids, state["model.embed_tokens.weight"]))
    logits = F.linear(hidden, state["lm_head.weight"])
    torch.testing.assert_close(logits, data["outputs"]["logits"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_hf_llama_cached_greedy_decoding(golden):
    data = golden("hf_llama.pt")
    state, ids = data["state_dict"], data["inputs"]["input_ids"][:, :4]
    model = hf_llama(data)
    embed = lambda t: F.embedding(t, state["model.embed_tokens.weight"])  # noqa: E731
    cache = model.new_cache(ids.shape[0], 16)
    tokens, chunk = ids, ids
    for _ in range(6):
        hidden = model(embed(chunk), cache=cache)
        chunk = F.linear(hidden[:, -1:], state["lm_head.weight"]).argmax(-1)
        tokens = torch.cat((tokens, chunk), dim=1)
    assert torch.equal(tokens, data["outputs"]["greedy"])
