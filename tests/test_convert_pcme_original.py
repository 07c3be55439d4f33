"""Converting an original PCME checkpoint reproduces the original's means and log variances.

The original architecture (naver-ai/pcme: torchvision ResNet, PIE-Nets, uncertainty modules, bi-GRU
caption encoder) is written below from its published description, with its key names, tiny.
"""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hf_pcme.conversion.pcme_original import (
    ConversionError,
    convert_checkpoint,
    load_vocabulary,
    save_converted,
)

D, WORD_DIM = 16, 12
WORDS = ["a", "dog", "cat", "on", "the", "grass", "red", "ball", "two", "people", "t-shirt", ".", "man", "'s"]


# ---------------------------------------------------------------- the original architecture, tiny
class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))  # fmt: skip

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, maxpool, layer1..4 of bottlenecks), one block per stage."""

    def __init__(self, width=8, planes=(2, 4, 8, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes = width
        for index, (p, stride) in enumerate(zip(planes, (1, 2, 2, 2)), start=1):
            setattr(self, f"layer{index}", nn.Sequential(Bottleneck(inplanes, p, stride)))
            inplanes = p * 4
        self.out_dim = inplanes

    def forward(self, x):  # the 7x7 map: the original replaces avgpool and fc by identities
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, n_head, d_in, d_hidden):
        super().__init__()
        self.w_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.w_2 = nn.Linear(d_hidden, n_head, bias=False)

    def forward(self, x, pad_mask=None):
        attn = self.w_2(torch.tanh(self.w_1(x)))
        if pad_mask is not None:
            attn = attn.masked_fill(pad_mask.unsqueeze(-1), float("-inf"))
        attn = attn.softmax(dim=1)
        return torch.bmm(attn.transpose(1, 2), x).squeeze(1)


class PIENet(nn.Module):
    def __init__(self, d_in, d_out, d_h):
        super().__init__()
        self.attention = MultiHeadSelfAttention(1, d_in, d_h)
        self.fc = nn.Linear(d_in, d_out)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, out, x, pad_mask=None):
        return self.layer_norm(out + torch.sigmoid(self.fc(self.attention(x, pad_mask))))


def last_token_output(rnn, x, lengths):
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    padded, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True)
    return padded[torch.arange(x.shape[0]), lengths - 1]


class UncertaintyModuleImage(nn.Module):
    def __init__(self, d_in, d_out, d_h):
        super().__init__()
        self.attention = MultiHeadSelfAttention(1, d_in, d_h)
        self.fc = nn.Linear(d_in, d_out)
        self.fc2 = nn.Linear(d_in, d_out)

    def forward(self, pooled, x):
        return self.fc(self.attention(x)) + self.fc2(pooled)


class UncertaintyModuleText(nn.Module):
    def __init__(self, d_in, d_out, d_h):
        super().__init__()
        self.attention = MultiHeadSelfAttention(1, d_in, d_h)
        self.fc = nn.Linear(d_in, d_out)
        self.rnn = nn.GRU(d_in, d_out // 2, bidirectional=True, batch_first=True)

    def forward(self, x, pad_mask, lengths):
        return self.fc(self.attention(x, pad_mask)) + last_token_output(self.rnn, x, lengths)


class EncoderImage(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = TinyResNet()
        cnn_dim = self.cnn.out_dim
        self.fc = nn.Linear(cnn_dim, D)
        self.pie_net = PIENet(cnn_dim, D, cnn_dim // 2)
        self.uncertain_net = UncertaintyModuleImage(cnn_dim, D, cnn_dim // 2)

    def forward(self, images):
        grid = self.cnn(images)
        pooled = grid.mean(dim=(2, 3))
        local = grid.flatten(2).transpose(1, 2)
        out = self.pie_net(self.fc(pooled), local)
        return nn.functional.normalize(out, dim=-1), self.uncertain_net(pooled, local)


class EncoderText(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, WORD_DIM)
        self.rnn = nn.GRU(WORD_DIM, D // 2, bidirectional=True, batch_first=True)
        self.pie_net = PIENet(WORD_DIM, D, WORD_DIM // 2)
        self.uncertain_net = UncertaintyModuleText(WORD_DIM, D, WORD_DIM // 2)

    def forward(self, ids, lengths):
        w = self.embed(ids)
        pad_mask = torch.arange(ids.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
        out = self.pie_net(last_token_output(self.rnn, w, lengths), w, pad_mask)
        return nn.functional.normalize(out, dim=-1), self.uncertain_net(w, pad_mask, lengths)


class OriginalPCME(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.img_enc = EncoderImage()
        self.txt_enc = EncoderText(vocab_size)


def word2idx():
    vocab = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    return vocab


ORIGINAL_CONFIG = {
    "model": {"name": "pcme", "embed_dim": D, "cnn_type": "resnet_tiny", "word_dim": WORD_DIM, "img_attention": True,
              "txt_attention": True, "img_probemb": True, "txt_probemb": True, "n_samples_inference": 7},
    "criterion": {"name": "pcme", "init_negative_scale": 15, "init_shift": 15, "num_samples": 7, "vib_beta": 1e-5},
}  # fmt: skip


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model = OriginalPCME(len(word2idx()))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")) or "bn" in name or "layer_norm" in name:
                tensor.uniform_(-0.3, 0.3)
    return model.eval()


def checkpoint_dict(original_model, **changes):
    data = {
        "model": original_model.state_dict(),
        "criterion": {"negative_scale": torch.tensor([7.5]), "shift": torch.tensor([3.25])},
        "optimizer": {"state": {}, "param_groups": []},
        "config": ORIGINAL_CONFIG,
        "word2idx": word2idx(),
        "metadata": {"epoch": 3},
    }
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def checkpoint_path(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pth"
    torch.save(checkpoint_dict(original), path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint_path):
    return convert_checkpoint(checkpoint_path)


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g)
    ids = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 8, 9, 10, 11, 2], [1, 12, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[:, 0] = 1
    return images, ids, mask


def test_converted_model_reproduces_means_and_log_variances(original, converted):
    images, ids, mask = inputs()
    model = converted.model
    with torch.no_grad():
        mean_v, logsigma_v = original.img_enc(images)
        mean_t, logsigma_t = original.txt_enc(ids, mask.sum(1))
        image = model.get_image_features(images, num_samples=0)
        text = model.get_text_features(ids, mask, num_samples=0)
    torch.testing.assert_close(image.mean, mean_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.mean, mean_t, rtol=1e-5, atol=1e-6)
    # log_sigma2 = 2 * logsigma (the original's logsigma is a log standard deviation)
    torch.testing.assert_close(image.log_sigma2, 2 * logsigma_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text.log_sigma2, 2 * logsigma_t, rtol=1e-5, atol=1e-5)
    assert logsigma_v.abs().max() > 0.05 and logsigma_t.abs().max() > 0.05  # not a trivial zero case
    # the sampler's standard deviation is the original's exp(logsigma)
    torch.testing.assert_close(torch.exp(0.5 * text.log_sigma2), torch.exp(logsigma_t), rtol=1e-5, atol=1e-6)
    assert model.negative_scale.item() == 7.5 and model.shift.item() == 3.25
    assert model.config.num_samples == 7


def test_saved_folder_loads_with_from_pretrained_processor_and_pipeline(converted, tmp_path):
    from transformers import AutoModel, AutoProcessor, pipeline

    import hf_pcme  # noqa: F401

    folder = save_converted(converted, tmp_path / "pcme-converted", cnn_type="tiny ResNet")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert not any(name.endswith((".pkl", ".pth", ".bin")) for name in names)
    assert {"text_encoder_pcme_original.py", "configuration_pcme_original_text.py"} <= names  # remote code
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    images, ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(ids, mask, num_samples=0).log_sigma2,
                                   converted.model.get_text_features(ids, mask, num_samples=0).log_sigma2)  # fmt: skip
    encoded = processor(text=["A dog on the GRASS.", "two people zebra"], return_tensors="pt")
    vocab = word2idx()
    assert encoded["input_ids"][0].tolist() == [vocab[w] for w in ["<start>", "a", "dog", "on", "the", "grass", ".", "<end>"]]
    assert encoded["input_ids"][1].tolist()[:5] == [1, vocab["two"], vocab["people"], vocab["<unk>"], 2]
    assert encoded["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert tuple(processor(images=[image])["pixel_values"].shape) == (1, 3, 224, 224)
    retriever = pipeline("cross-modal-retrieval", model=str(folder))
    result = retriever(images=[image], corpus=["a dog", "a red ball", "two people"], top_k=2)
    assert len(result[0]) == 2
    assert "log_sigma2 = 2 * logsigma" in (folder / "README.md").read_text()


def test_vocabulary_pickle_and_json_are_read_as_plain_data(tmp_path, caplog):
    vocab = word2idx()
    pickled = tmp_path / "coco_vocab.pkl"
    pickled.write_bytes(pickle.dumps({"idx": len(vocab), "word2idx": vocab, "idx2word": {v: k for k, v in vocab.items()}}))
    with caplog.at_level(logging.WARNING, logger="hf_pcme.conversion.pcme_original"):
        assert load_vocabulary(pickled) == vocab
    assert "Unpickling can run code" in caplog.text
    as_json = tmp_path / "vocab.json"
    as_json.write_text(json.dumps(vocab))
    assert load_vocabulary(as_json) == vocab

    class Sneaky:
        def __reduce__(self):
            return (print, ("side effect",))

    sneaky = tmp_path / "sneaky.pkl"
    sneaky.write_bytes(pickle.dumps({"word2idx": Sneaky()}))
    with pytest.raises(ConversionError, match=r"builtins\.print"):
        load_vocabulary(sneaky)


def test_truncated_checkpoint_is_rejected(checkpoint_path, tmp_path):
    truncated = tmp_path / "model_best.pth"
    truncated.write_bytes(checkpoint_path.read_bytes()[: checkpoint_path.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated or not a torch checkpoint"):
        convert_checkpoint(truncated)


def test_checkpoint_of_another_architecture_is_rejected(original):
    state = original.state_dict()
    pvse_like = {k: v for k, v in state.items() if "uncertain_net" not in k}
    with pytest.raises(ConversionError, match=r"Not an original PCME checkpoint.*uncertain_net"):
        convert_checkpoint(checkpoint_dict(original, model=pvse_like))
    vgg_like = {("img_enc.cnn.features.0.weight" if k == "img_enc.cnn.conv1.weight" else k): v for k, v in state.items()}
    with pytest.raises(ConversionError, match=r"lacks \['img_enc.cnn.conv1.weight'\]"):
        convert_checkpoint(checkpoint_dict(original, model=vgg_like))
    extra = {**state, "img_enc.extra_head.weight": torch.zeros(2)}
    with pytest.raises(ConversionError, match=r"not mapped.*img_enc\.extra_head\.weight"):
        convert_checkpoint(checkpoint_dict(original, model=extra))
    config = {**ORIGINAL_CONFIG, "model": {**ORIGINAL_CONFIG["model"], "cnn_type": "resnet152"}}
    with pytest.raises(ConversionError, match=r"resnet152.*stages \[1, 1, 1, 1\]"):
        convert_checkpoint(checkpoint_dict(original, config=config))


def test_shape_mismatch_names_both_tensors(original):
    state = dict(original.state_dict())
    state["img_enc.cnn.layer2.0.conv2.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(ConversionError, match=r"img_enc\.cnn\.layer2\.0\.conv2\.weight.*\(4, 4, 1, 1\).*"
                                              r"vision_model\.encoder\.stages\.1\.layers\.0\.layer\.1\.convolution\.weight"):
        convert_checkpoint(checkpoint_dict(original, model=state))
    state = dict(original.state_dict())
    state["txt_enc.pie_net.fc.bias"] = torch.zeros(D + 1)
    with pytest.raises(ConversionError, match=r"txt_enc\.pie_net\.fc\.bias.*\(17,\).*text_head\.mean_branch\.local_proj\.bias"):
        convert_checkpoint(checkpoint_dict(original, model=state))
    state = dict(original.state_dict())
    state["img_enc.uncertain_net.fc2.bias"] = torch.zeros(D + 1)
    with pytest.raises(ConversionError, match=r"img_enc\.uncertain_net\.fc\.bias \(16,\), img_enc\.uncertain_net\.fc2\.bias \(17,\)"):
        convert_checkpoint(checkpoint_dict(original, model=state))


def test_vocabulary_that_does_not_fit_the_embedding_matrix_is_rejected(original, tmp_path):
    small = dict(list(word2idx().items())[:-1])
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(small))
    data = checkpoint_dict(original)
    del data["word2idx"]
    with pytest.raises(ConversionError, match=r"does not fit the embedding matrix.*17 words.*18 rows"):
        convert_checkpoint(data, vocab=path)
    with pytest.raises(ConversionError, match="differs from the checkpoint's word2idx"):
        convert_checkpoint(checkpoint_dict(original), vocab=path)


def test_command_line_converts_with_vocab_pickle_and_yaml(checkpoint_path, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "scripts" / "convert_pcme_original_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_pcme_original_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    vocab = word2idx()
    (tmp_path / "coco_vocab.pkl").write_bytes(pickle.dumps({"idx": len(vocab), "word2idx": vocab, "idx2word": {}}))
    (tmp_path / "pcme_tiny.yaml").write_text(yaml.safe_dump(ORIGINAL_CONFIG))
    argv = ["--checkpoint", str(checkpoint_path), "--vocab", str(tmp_path / "coco_vocab.pkl"),
            "--config", str(tmp_path / "pcme_tiny.yaml"), "--output", str(tmp_path / "out")]  # fmt: skip
    assert script.run(argv) == 0
    assert "Converted" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    assert "resnet_tiny" in (tmp_path / "out" / "README.md").read_text()
    argv[1] = str(tmp_path / "pcme_tiny.yaml")  # not a checkpoint
    assert script.run(argv) == 2
    assert "truncated or not a torch checkpoint" in capsys.readouterr().err


def test_checkpoint_with_numpy_scores_in_metadata_loads_weights_only(original, tmp_path):
    path = tmp_path / "model_best.pth"
    torch.save(checkpoint_dict(original, metadata={"rsum": np.float64(500.5), "epoch": np.int64(3)}), path)
    assert convert_checkpoint(path).model.config.embed_dim == D


def test_cub_config_sets_its_loss_and_match_parameters(original):
    cub = {"model": {**ORIGINAL_CONFIG["model"], "cnn_type": "resnet_tiny"},
           "criterion": {"name": "pcme", "init_negative_scale": 5, "init_shift": 5, "num_samples": 7,
                         "vib_beta": 0.001, "uniform_lambda": 10}}  # fmt: skip
    config = convert_checkpoint(checkpoint_dict(original, config=cub, criterion={})).model.config
    assert config.loss_kwargs == {"vib_beta": 0.001, "uniformity_weight": 10.0}
    assert (config.init_negative_scale, config.init_shift) == (5.0, 5.0)


def test_samples_and_match_probabilities_are_the_originals(original, converted):
    """Same noise: samples mean + exp(logsigma) eps, and the original's p = mean_jj' e^s / (e^s + e^-s),
    s = -a sqrt(||z_v - z_t||^2 + 1e-6) + b."""
    images, ids, mask = inputs()
    model, j = converted.model, 7
    with torch.no_grad():
        mean_v, logsigma_v = original.img_enc(images)
        mean_t, logsigma_t = original.txt_enc(ids, mask.sum(1))
        image = model.get_image_features(images, num_samples=j, generator=torch.Generator().manual_seed(5))
        text = model.get_text_features(ids, mask, num_samples=j, generator=torch.Generator().manual_seed(6))
        ours = model.pairwise_logits(image, text)  # log p
    eps_v = torch.randn((3, j, D), generator=torch.Generator().manual_seed(5))
    eps_t = torch.randn((3, j, D), generator=torch.Generator().manual_seed(6))
    samples_v = mean_v.unsqueeze(1) + torch.exp(logsigma_v).unsqueeze(1) * eps_v
    samples_t = mean_t.unsqueeze(1) + torch.exp(logsigma_t).unsqueeze(1) * eps_t
    torch.testing.assert_close(image.samples, samples_v, rtol=1e-5, atol=1e-5)
    expected = torch.empty(3, 3)
    for v in range(3):
        for t in range(3):
            distance = torch.sqrt(((samples_v[v].unsqueeze(1) - samples_t[t].unsqueeze(0)) ** 2).sum(-1) + 1e-6)
            logit = -7.5 * distance + 3.25
            expected[v, t] = (torch.exp(logit) / (torch.exp(logit) + torch.exp(-logit))).mean()
    torch.testing.assert_close(ours, torch.log(expected), rtol=1e-5, atol=1e-4)
    assert float(ours.max() - ours.min()) > 1.0  # the pairs differ
