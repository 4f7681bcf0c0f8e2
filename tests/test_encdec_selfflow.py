"""Trainable encoders / decoders around the transformer, Self-Flow, create_ema and constructor checks
(transfusion-pytorch parity, issue 18)."""

import copy

import pytest
import torch
from ema_pytorch import EMA
from torch import nn, randint, randn

from mmgen_pytorch import SelfMaskedRepTraining, Transfusion
from mmgen_pytorch.saving import read_config
from mmgen_pytorch.transfusion.enc_dec import from_blocks, to_blocks
from mmgen_pytorch.transfusion.self_flow import capture_hidden, cosine_rep_loss

from _helpers import assert_close_f32


def unet_model(**overrides):
    torch.manual_seed(0)
    enc_dec = (nn.Conv2d(4, 16, 3, 2, 1), nn.ConvTranspose2d(16, 4, 3, 2, 1, output_padding=1))
    config = dict(num_text_tokens=10, dim_latent=4, modality_default_shape=(8, 8), channel_first_latent=True,
                  pre_post_transformer_enc_dec=enc_dec, modality_num_dim=2, prob_uncond=0.0,
                  transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    return Transfusion(**{**config, **overrides})


def test_blocks_round_trip_and_order():
    latent = torch.arange(4 * 6 * 3.0).view(4, 6, 3)
    tokens = to_blocks(latent, (2, 3))
    assert tokens.shape == (2, 2, 18)
    assert torch.equal(tokens[1, 0].view(2, 3, 3), latent[2:4, 0:3])  # one token = one 2x3 block
    assert torch.equal(from_blocks(tokens, (2, 3)), latent)


def test_unet_shapes_and_every_parameter_gets_a_gradient():
    model = unet_model(add_pos_emb=True)
    assert model.modalities[0].downsample == (2, 2) and model.modalities[0].default_shape == (4, 4)
    loss = model(randn(2, 4, 8, 8))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None and "to_text_logits" not in name]
    assert not missing
    encoder = model.modality_layers[0].encoder
    assert encoder.weight.grad.abs().sum() > 0 and model.modality_layers[0].decoder.weight.grad.abs().sum() > 0
    assert model.generate_modality_only(progress=False, generator=0).shape == (1, 4, 8, 8)


def test_an_enc_dec_of_lower_rank_than_the_rotary_axes_encodes_each_instance_whole():
    torch.manual_seed(0)
    enc_dec = (nn.Conv1d(4, 16, 3, 2, 1), nn.ConvTranspose1d(16, 4, 3, 2, 1, output_padding=1))
    model = Transfusion(num_text_tokens=10, dim_latent=(4, 4), modality_default_shape=((8,), (2, 2)),
                        channel_first_latent=True, pre_post_transformer_enc_dec=[enc_dec, None],
                        transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    assert model.rotary_axes == 2 and model.modalities[0].rank == 1
    layers, latent = model.modality_layers[0], randn(4, 8)  # channel-first: 8 latents -> 4 tokens
    coords = model.placement.coords((4,)).repeat(2, 1)  # two instances in one run
    assert layers._instances(coords) == [(0, 4, (4,)), (4, 8, (4,))]
    values = to_blocks(latent.T, (2,)).repeat(2, 1)
    expected = enc_dec[0](latent[None])[0].T  # the encoder on the whole latent
    assert_close_f32(layers.embed(values, coords), expected.repeat(2, 1))


def test_unet_forward_equals_enc_then_model_then_dec():
    model = unet_model().eval()
    x, noise, t = randn(1, 4, 8, 8), randn(1, 4, 8, 8), 0.3
    layers = model.modality_layers[0]
    noise_tokens = to_blocks(noise[0].movedim(0, -1), (2, 2)).reshape(16, 16)
    with capture_hidden(model, 0) as inputs, capture_hidden(model, 2) as outputs:
        loss, breakdown = model(x, times=[[t]], noise=[[noise_tokens]], return_breakdown=True)
    noised = model.objective.noised(x, noise, torch.tensor(t))
    embedded = layers.encoder(noised).flatten(2).transpose(1, 2)[0]       # [16 tokens, dim]
    latent_index = slice(6, 22)  # after [sos] [meta] "4,4" [som]
    assert_close_f32(inputs.hidden[0, latent_index], embedded)
    hidden = outputs.hidden[0, latent_index].T.reshape(1, 16, 4, 4)
    prediction = layers.decoder(hidden)
    assert_close_f32(breakdown.flow[0], ((prediction - (x - noise)) ** 2).mean())


def test_unet_channel_last_and_skip_connection_module():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4 * 4, 16)

        def forward(self, x):  # [1, H, W, 4] -> [1, H/2, W/2, 16]
            return self.proj(to_blocks(x[0], (2, 2))[None])

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 4 * 4)

        def forward(self, h):  # [1, h, w, 16] -> [1, 2h, 2w, 4]
            return from_blocks(self.proj(h[0]), (2, 2))[None]

    model = unet_model(channel_first_latent=False, pre_post_transformer_enc_dec=(Down(), Up()))
    model(randn(2, 6, 4, 4)).backward()
    assert all(p.grad is not None for p in model.modality_layers.parameters())


def test_enc_dec_errors():
    with pytest.raises(ValueError, match="pre_post_transformer_enc_dec"):
        unet_model(pre_post_transformer_enc_dec=(nn.Identity(), nn.Identity(), nn.Identity()))
    with pytest.raises(ValueError, match="modality_default_shape"):
        unet_model(modality_default_shape=None)
    with pytest.raises(ValueError, match="needs grid positions"):
        unet_model(positions="flat")
    wrong = unet_model(pre_post_transformer_enc_dec=(nn.Conv2d(4, 8, 3, 2, 1), nn.Identity()))
    with pytest.raises(ValueError, match="encoder must return 16 channels"):
        wrong(randn(1, 4, 8, 8))


def test_enc_dec_save_load_round_trip(tmp_path):
    model = unet_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "m")
    assert "modality_layers.0.encoder.weight" in model.state_dict()
    fresh = (nn.Conv2d(4, 16, 3, 2, 1), nn.ConvTranspose2d(16, 4, 3, 2, 1, output_padding=1))
    loaded = Transfusion.load(tmp_path / "m", pre_post_transformer_enc_dec=fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(TypeError, match="pre_post_transformer_enc_dec"):
        Transfusion.load(tmp_path / "m")


def tiny_zero_dim(**overrides):
    torch.manual_seed(0)
    return Transfusion(**{**dict(num_text_tokens=32, dim_latent=8, modality_default_shape=(),
                                 transformer=dict(dim=16, depth=2)), **overrides})


def batch():
    torch.manual_seed(1)
    return [[randint(0, 32, (5,)), randn(8), randint(0, 32, (3,)), randn(8)], [randint(0, 32, (4,)), randn(8)]]


def test_self_flow_loss_against_a_direct_computation():
    model = tiny_zero_dim(prob_uncond=0.5)
    wrapper = SelfMaskedRepTraining(model, student_layer=1, teacher_layer=-1, student_dropout_rate=0.1,
                                    rep_loss_weight=0.5)
    teacher = wrapper.teacher.ema_model
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = batch()
    torch.manual_seed(7)
    total, (student_loss, rep_loss) = wrapper(data)

    # the same draws by hand: the student at dropout 0.1, then the teacher from the same RNG state at 0
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    with capture_hidden(model, 1) as student:
        expected_student = model(data)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    torch.set_rng_state(state)
    teacher.train()
    with torch.no_grad(), capture_hidden(teacher, 3) as target:
        teacher(data)
    real = student.layout.segment_ids != -1
    prediction = wrapper.student_predict_head(student.hidden)[real]
    expected_rep = 1 - nn.functional.cosine_similarity(prediction, target.hidden[real], dim=-1).mean()
    assert_close_f32(student_loss, expected_student)
    assert_close_f32(rep_loss, expected_rep)
    assert_close_f32(total, expected_student + 0.5 * expected_rep)
    total.backward()
    assert all(p.grad is not None for p in wrapper.student_predict_head.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_self_flow_update_teacher_follows_ema_pytorch():
    model = tiny_zero_dim()
    wrapper = SelfMaskedRepTraining(model, ema_beta=0.9, ema_kwargs=dict(update_after_step=0, update_every=1))
    reference = EMA(copy.deepcopy(model), beta=0.9, update_after_step=0, update_every=1)
    for step in range(3):
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.online_model[0].parameters() if isinstance(
                    reference.online_model, list) else reference.online_model.parameters()):
                noise = 0.1 * torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)
        wrapper.update_teacher()
        reference.update()
    for (name, p), q in zip(wrapper.teacher.ema_model.named_parameters(), reference.ema_model.parameters()):
        assert_close_f32(p, q)
    assert set(map(id, wrapper.parameters())) == set(map(id, [*model.parameters(),
                                                              *wrapper.student_predict_head.parameters()]))


def test_self_flow_errors():
    model = tiny_zero_dim()
    with pytest.raises(ValueError, match="student_dropout_rate"):
        SelfMaskedRepTraining(model, student_dropout_rate=0.0, teacher_dropout_rate=0.0)
    with pytest.raises(ValueError, match="teacher_layer"):
        SelfMaskedRepTraining(model, teacher_layer=4)


def test_create_ema_honours_its_arguments():
    model = tiny_zero_dim()
    ema = model.create_ema(beta=0.5, update_after_step=3, update_every=2, include_online_model=False)
    assert (ema.beta, ema.update_after_step, ema.update_every, ema.include_online_model) == (0.5, 3, 2, False)
    assert callable(ema.sample) and callable(ema.generate_modality_only)


def test_zero_dim_default_shape_is_one_shape():
    model = tiny_zero_dim()
    assert model.modalities[0].default_shape == () and model.modalities[0].rank is None  # rank free
    model(batch()).backward()
    two = Transfusion(num_text_tokens=8, dim_latent=(4, 4), modality_default_shape=((), (2,)),
                      transformer=dict(dim=16, depth=1))
    assert [m.default_shape for m in two.modalities] == [(), (2,)]


def test_prob_uncond_one_is_accepted_and_shape_rank_mismatch_rejected():
    model = tiny_zero_dim(prob_uncond=1.0)
    model(batch())
    with pytest.raises(ValueError, match=r"`prob_uncond` must be in \[0, 1\], got 1.5"):
        tiny_zero_dim(prob_uncond=1.5)
    with pytest.raises(ValueError, match=r"`modality_default_shape` \(8,\) .* `modality_num_dim` says 2"):
        tiny_zero_dim(modality_default_shape=(8,), modality_num_dim=2)


def test_modality_processing_is_accepted_ignored_and_checked(tmp_path):
    """transfusion-pytorch's batching-strategy names are accepted (same loss: one packing path here) and kept
    through save / load; an unknown name is refused naming the argument."""
    torch.manual_seed(0)
    plain = tiny_zero_dim()
    torch.manual_seed(0)
    flat = tiny_zero_dim(modality_processing="flat")
    data = batch()
    torch.manual_seed(1)
    expected = plain(data)
    torch.manual_seed(1)
    assert torch.equal(flat(data), expected)
    assert read_config(flat.save(tmp_path / "model"))["config"]["modality_processing"] == "flat"
    reloaded = Transfusion.load(tmp_path / "model").train()
    torch.manual_seed(1)
    assert torch.equal(reloaded(data), expected)
    with pytest.raises(ValueError, match=r"`modality_processing` must be one of .*got 'fastest'"):
        tiny_zero_dim(modality_processing="fastest")


def test_encoder_without_batch_dim():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    for flag, shape in ((True, (1, 3, 8)), (False, (3, 8))):
        model = tiny_zero_dim(modality_default_shape=(3,), modality_encoder=Record(),
                              modality_encoder_decoder_requires_batch_dim=flag)
        model([[randn(3, 8)]])
        assert seen[-1] == shape


def test_sampled_shape_function_and_fallback():
    model = tiny_zero_dim(modality_default_shape=(2,), to_modality_shape_fn=lambda text: (int(text) + 1,))
    ids = model.vocab.shape_ids((3,))
    assert model.emitted_shape(0, ids) == (4,)
    plain = tiny_zero_dim(modality_default_shape=(2,), modality_num_dim=1)  # a fixed rank checks the emitted shape
    with pytest.raises(ValueError, match="fallback_to_default_shape_if_invalid"):
        plain.emitted_shape(0, plain.vocab.shape_ids((3, 3)))
    falls_back = tiny_zero_dim(modality_default_shape=(2,), modality_num_dim=1,
                               fallback_to_default_shape_if_invalid=True)
    with pytest.warns(UserWarning, match="default shape"):
        assert falls_back.emitted_shape(0, falls_back.vocab.shape_ids((3, 3))) is None
    with pytest.warns(UserWarning, match="no valid shape"):
        assert plain.emitted_shape(0, [plain.vocab.meta]) is None
    with pytest.raises(ValueError, match="to_modality_shape_fn"):
        tiny_zero_dim(to_modality_shape_fn=(None, None))
