"""Every bad option value of issue 13, as a table: exit code 2, exactly one line on stderr naming the
problem, and nothing written (the test's directory is byte for byte what it was). Each case is
refused by validation, before Ray starts or anything is encoded or sampled."""

import json
import os
import shutil

import pytest

from spellshield.jobs.cli import main
from spellshield.pipeline.config import MAX_IMAGES, MAX_SEED


def snapshot(path):
    out = {}
    for d, dirs, files in os.walk(path):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            full = os.path.join(d, name)
            out[os.path.relpath(full, path)] = os.readlink(full) if os.path.islink(full) else open(full, "rb").read()
        for name in dirs:
            out.setdefault(os.path.relpath(os.path.join(d, name), path) + "/", b"")
    return out


def refused(capsys, tmp_path, argv):
    """Run the CLI; returns its one stderr line after checking exit code 2 and an unchanged tmp_path."""
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert snapshot(tmp_path) == before
    return err[0]


# ---- generate -------------------------------------------------------------------------------------------

def prompts_file(tmp_path, content: bytes):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    return str(path)


GENERATE_CASES = {
    # argparse's own errors: one line pointing to --help, not the 22-line usage
    "radius-not-a-number": (["--radius", "abc"], "argument --radius: invalid float value: 'abc' (see spellshield generate --help)"),
    "unknown-policy": (["--on-breach", "ignore"], "argument --on-breach: invalid choice: 'ignore'"),
    # non-finite floats: a radius or a push of inf/nan would disable or break the shield
    "radius-inf": (["--index", "{index}", "--radius", "inf"], "--radius must be a finite number, got inf"),
    "overcompensation-inf": (["--overcompensation", "inf"], "--overcompensation must be a finite number, got inf"),
    "overcompensation-nan": (["--overcompensation", "nan"], "--overcompensation must be a finite number, got nan"),
    "batch-radius-inf": (["--batch-radius", "inf"], "--batch-radius must be a finite number, got inf"),
    # seeds: sample i uses seed + i, an int64 / torch seed
    "seed-2^64-1": (["--seed", str(2**64 - 1)], f"--seed must be in 0..{MAX_SEED - 15} for 16 image(s)"),
    "seed-negative": (["--seed", "-1"], "--seed must be in 0.."),
    "seed-overflows-with-count": (["--seed", str(MAX_SEED), "--num-images", "2"], f"--seed must be in 0..{MAX_SEED - 1} for 2"),
    # image counts: refused at once, not planned for minutes
    "num-images-1e12": (["--num-images", "1000000000000"], f"--num-images 1000000000000 is over the limit of {MAX_IMAGES}"),
    "prompts-num-images-1e12": (["--prompts", b'{"prompt": "a", "num_images": 1000000000000}\n'],
                                f"line 1: 1000000000000 images in all so far, over the limit of {MAX_IMAGES}"),
    "prompts-total-over-limit": (["--prompts", (f'{{"prompt": "a", "num_images": {MAX_IMAGES}}}\n"b"\n').encode()],
                                 f"line 2: {MAX_IMAGES + 1} images in all so far"),
    "prompts-seeds-bool": (["--prompts", b'{"prompt": "a", "seeds": [true, false]}\n'], '"seeds" must be a list of integers in 0..'),
    "prompts-seeds-2^70": (["--prompts", b'{"prompt": "a", "seeds": [1180591620717411303424]}\n'], '"seeds" must be a list of integers'),
    "prompts-num-images-bool": (["--prompts", b'{"prompt": "a", "num_images": true}\n'], '"num_images" must be a positive integer'),
    "prompts-invalid-utf8": (["--prompts", b'"a cat"\n"caf\xe9"\n'], "line 2 is not valid UTF-8 (byte 5 of the line)"),
    # the run directory
    "out-inside-a-file": (["--out", "{tmp}/afile/run"], "afile is a file, not a directory"),
    "out-dangling-symlink": (["--out", "{tmp}/dangling"], "is a dangling symbolic link"),
    "out-unwritable": (["--out", "/proc/spellshield-no-such-run"], "--out /proc/spellshield-no-such-run: cannot write in /proc"),
    # the index pin
    "index-sha256-mismatch": (["--index", "{index}", "--index-sha256", "0" * 64], f"not the pinned --index-sha256 {'0' * 64}"),
    # a backend whose structure was never built is refused up front, naming the command that builds it
    "ivf-without-structure": (["--index", "{index}", "--search-backend", "ivf"], "has no inverted file for its 256-dim projection"),
    "index-sha256-not-hex": (["--index", "{index}", "--index-sha256", "xyz"], "--index-sha256 must be 64 hex digits, got 'xyz'"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_bad_generate_inputs(capsys, memorizer_model, protected_index, tmp_path, case):
    extra, message = GENERATE_CASES[case]
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    extra = [prompts_file(tmp_path, a) if isinstance(a, bytes) else a.format(tmp=tmp_path, index=protected_index) for a in extra]
    argv = ["generate", "--model", memorizer_model, "--out", str(tmp_path / "run"), *extra]
    line = refused(capsys, tmp_path, argv)
    assert line.startswith("spellshield generate: error: ") and message in line, line


def edited_model(src, tmp_path, change):
    model = tmp_path / "model"
    shutil.copytree(src, model)
    index = json.loads((model / "model_index.json").read_text())
    change(index)
    (model / "model_index.json").write_text(json.dumps(index))
    return str(model)


MODEL_CASES = {
    "class-name-list": (lambda i: i.update(_class_name=["diffusers", "DDPMPipeline"]),
                        "_class_name must be a string naming a pipeline class, got ['diffusers', 'DDPMPipeline']"),
    "class-not-a-pipeline": (lambda i: i.update(_class_name="AutoencoderKL"),
                             "_class_name 'AutoencoderKL' is not a diffusers pipeline class"),
    "component-from-another-library": (lambda i: i.update(scheduler=["os", "system"]),
                                       "component 'scheduler' comes from library 'os'; only diffusers, transformers"),
    "component-class-unknown": (lambda i: i.update(scheduler=["diffusers", "NoSuchScheduler"]),
                                "component 'scheduler' names diffusers.NoSuchScheduler, which is not a class of diffusers"),
    "component-malformed": (lambda i: i.update(scheduler=["diffusers"]), "component 'scheduler' must be [library, class]"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_index(capsys, memorizer_model, tmp_path, case):
    change, message = MODEL_CASES[case]
    model = edited_model(memorizer_model, tmp_path, change)
    line = refused(capsys, tmp_path, ["generate", "--model", model, "--num-images", "2", "--out", str(tmp_path / "run")])
    assert message in line, line


# ---- build-index ----------------------------------------------------------------------------------------

def garbage_encoder(tmp_path, kind):
    directory = tmp_path / f"enc-{kind}"
    directory.mkdir()
    junk = bytes(range(256)) * 8
    if kind == "pth":  # the released TAEF2 layout, with files that are no torch weights
        (directory / "taef2_encoder.pth").write_bytes(junk)
        (directory / "taef2_decoder.pth").write_bytes(junk)
    else:
        (directory / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
        (directory / f"diffusion_pytorch_model.{kind}").write_bytes(junk)
    return str(directory)


BUILD_CASES = {
    "encoder-undecodable-pth": (["--encoder", "{enc_pth}"], "its weights cannot be loaded (UnpicklingError: not a weights-only torch file)"),
    "encoder-undecodable-bin": (["--encoder", "{enc_bin}"], "its weights cannot be loaded (OSError: Unable to load weights"),
    "encoder-undecodable-safetensors": (["--encoder", "{enc_safetensors}"], "its weights cannot be loaded"),
    "out-symlink-to-empty-dir": (["--out", "{tmp}/link"], "is a symbolic link (to "),
    "out-dangling-symlink": (["--out", "{tmp}/dangling"], "is a dangling symbolic link"),
    "out-inside-a-file": (["--out", "{tmp}/afile/index"], "afile is a file, not a directory"),
    "max-member-bytes-zero": (["--max-member-bytes", "0"], "--max-member-bytes must be >= 1, got 0"),
    "shard-size-not-a-number": (["--shard-size", "abc"], "argument --shard-size: invalid int value: 'abc' (see spellshield build-index --help)"),
    "dtype-unknown": (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
}


@pytest.mark.parametrize("case", list(BUILD_CASES))
def test_bad_build_index_inputs(capsys, digits_corpus, tmp_path, case):
    extra, message = BUILD_CASES[case]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    encoders = {f"enc_{k}": garbage_encoder(tmp_path, k) for k in ("pth", "bin", "safetensors")}
    extra = [a.format(tmp=tmp_path, **encoders) for a in extra]
    argv = ["build-index", "--corpus", digits_corpus[0], "--out", str(tmp_path / "index"), "--resolution", "8", *extra]
    line = refused(capsys, tmp_path, argv)
    assert line.startswith("spellshield build-index: error: ") and message in line, line


# ---- what a good run says about its shield ----------------------------------------------------------------

def test_a_pinned_index_runs_and_generate_says_its_radius(capsys, ray_session, memorizer_model, protected_index, tmp_path):
    from spellshield.indexing.manifest import manifest_hash, read_manifest
    from spellshield.jobs.checks import radius_line

    sha = manifest_hash(protected_index)
    code = main(["generate", "--model", memorizer_model, "--index", protected_index, "--index-sha256", sha.upper(),
                 "--num-images", "2", "--steps", "3", "--out", str(tmp_path / "run")])
    assert code == 0
    radius = read_manifest(protected_index).suggested_radius
    line = (f"generate: shield radius {radius:.6g} from the index manifest's calibration "
            f"(half the median 1-NN distance of the corpus (self excluded)); index {protected_index}, manifest sha256 {sha}")
    assert line in capsys.readouterr().err.splitlines()
    assert radius_line(0.25, 0.25, protected_index).startswith("generate: shield radius 0.25 from --radius; index ")
    assert radius_line(None, None, None) == "generate: no --index: the run is NOT shielded"


def test_model_vae_that_cannot_load_is_one_usage_error(memorizer_model, protected_index, tmp_path):
    # a model directory whose own vae/ holds no loadable weights: refused before Ray, naming it
    import dataclasses

    from spellshield.jobs.run_config import check_model_fits_index
    from spellshield.jobs.runtime import UsageError
    from spellshield.pipeline.loading import describe_model

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 8)
    model = dataclasses.replace(describe_model(memorizer_model), vae_path=str(vae))
    with pytest.raises(UsageError, match=r"--model: its VAE at .*vae cannot be loaded \("):
        check_model_fits_index(model, protected_index)
