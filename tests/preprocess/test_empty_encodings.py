"""preprocess/empty_encodings.py: encodings of "" saved as float16 through format.save_empty_encodings."""

import numpy as np
import torch
from preprocess_testlib import load_script

from flux_nemo.data.format import RecordShapes, load_empty_encodings

empty = load_script("empty_encodings")


@torch.no_grad()
def test_empty_prompt_encodings(tmp_path, tiny_encoder_paths):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    out = tmp_path / "empty"
    assert empty.main(["--t5", tiny_encoder_paths["t5"], "--clip", tiny_encoder_paths["clip"],
                       "--output-dir", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert (
        np.load(out / "t5_empty.npy").dtype == np.float16
        and np.load(out / "clip_empty.npy").dtype == np.float16
    )
    t5, clip = load_empty_encodings(out, RecordShapes(t5_len=256, t5_dim=32, clip_dim=32))
    assert t5.shape == (1, 256, 32) and clip.shape == (1, 32) and t5.dtype == torch.bfloat16

    # direct: T5 tokens are </s> then 255 pads, CLIP tokens BOS EOS then pads to 77; bf16 models, no masks
    t5_tok = AutoTokenizer.from_pretrained(tiny_encoder_paths["t5"], local_files_only=True)
    ids = t5_tok([""], padding="max_length", max_length=256, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 0] == t5_tok.eos_token_id and (ids[0, 1:] == t5_tok.pad_token_id).all()
    clip_tok = AutoTokenizer.from_pretrained(tiny_encoder_paths["clip"], local_files_only=True)
    cids = clip_tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert cids[0, :2].tolist() == [clip_tok.bos_token_id, clip_tok.eos_token_id]
    t5_model = T5EncoderModel.from_pretrained(tiny_encoder_paths["t5"]).to(torch.bfloat16)
    clip_model = CLIPTextModel.from_pretrained(tiny_encoder_paths["clip"]).to(torch.bfloat16)
    want_t5 = t5_model(input_ids=ids).last_hidden_state
    want_clip = clip_model(input_ids=cids).pooler_output
    assert torch.equal(t5, want_t5.to(torch.float16).to(torch.bfloat16))
    assert torch.equal(clip, want_clip.to(torch.float16).to(torch.bfloat16))
    assert not torch.equal(t5[0, 0], t5[0, 1])  # </s> and pad positions differ
