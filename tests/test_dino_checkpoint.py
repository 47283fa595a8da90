"""Losing nothing: exact mid-epoch resume, clean stops on signals, full disks, bad flags and
inputs refused in one line, --init_from (dino_checkpoint.py and its helpers in utils.py)."""
import argparse
import errno
import json
import os
import random
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import dino_checkpoint
import main_dino
import utils
import vision_transformer as vits
from benchmarks import resume_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Writing files on a full disk
# ------------------------------------------------------------------------------------------------

class DiskFillingFile:
    """A real file whose writes fail with ENOSPC once `room` bytes are written (a full disk)."""

    def __init__(self, path, mode, room):
        self.file, self.room = open(path, mode), room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def fill_disk_after(monkeypatch, room):
    monkeypatch.setattr(utils, "open", lambda path, mode="r": DiskFillingFile(path, mode, room),
                        raising=False)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_no_partial_file(
        tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    utils.save_on_master({"weights": torch.zeros(10)}, path)
    fill_disk_after(monkeypatch, room=2000)
    with pytest.raises(utils.InputError) as error:
        utils.save_on_master({"weights": torch.ones(100_000)}, path)
    assert str(error.value) == (f"cannot write {path!r}: no space left on device (free some "
                                "space, or choose another --output_dir)")
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert torch.equal(utils.load_checkpoint_file(path)["weights"], torch.zeros(10))


def test_full_disk_during_a_log_append_leaves_no_torn_line(tmp_path, monkeypatch):
    path = str(tmp_path / "log.txt")
    utils.append_json_line(path, {"train_loss": 1.0, "epoch": 0})
    fill_disk_after(monkeypatch, room=10)
    with pytest.raises(utils.InputError, match="log.txt': no space left on device"):
        utils.append_json_line(path, {"train_loss": 2.0, "epoch": 1})
    with open(path) as log_file:
        assert log_file.read() == '{"train_loss": 1.0, "epoch": 0}\n'


def test_torch_error_without_errno_is_read_from_the_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda folder: argparse.Namespace(free=0))
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert "no space left on device" in str(utils.write_error(str(tmp_path / "x.pth"), error))


def test_torn_last_log_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text('{"train_loss": 1.0, "epoch": 0}\n{"train_loss": 2.0, "epoch": 1}\n'
                    '{"train_loss": 3.0, "ep')
    utils.truncate_json_log(str(path), 5)
    assert "dropping the torn last line" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    path.write_text('{"epoch": 0}\n{"ep\n{"epoch": 2}\n')
    with pytest.raises(utils.InputError, match="line 2 of .* is not JSON"):
        utils.truncate_json_log(str(path), 5)


def test_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(utils.InputError, match="--output_dir .* is not writable: not a directory"):
        dino_checkpoint.prepare_output_dir(str(tmp_path / "a_file" / "out"))
    dino_checkpoint.prepare_output_dir(str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path / "new" / "out") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_dir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(utils.InputError, match="is not writable: permission denied"):
            dino_checkpoint.prepare_output_dir(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)


def test_stale_temporary_files_of_this_run_are_removed(tmp_path, capsys):
    names = ["checkpoint.pth.tmp123", "checkpoint0020.pth.tmp9", "log.txt.tmp4", "keep.tmp1",
             "checkpoint.pth", ".write_test.host.5"]
    for name in names:
        (tmp_path / name).write_text("x")
    dino_checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "keep.tmp1"]
    assert "Removed 4 temporary files" in capsys.readouterr().out


def test_periodic_checkpoint_is_written_before_checkpoint_pth(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(dino_checkpoint, "save_checkpoint",
                        lambda state, path: written.append((os.path.basename(path), state)))
    checkpoints = dino_checkpoint.Checkpoints(str(tmp_path), 2, 0, lambda epoch: {"epoch": epoch},
                                              {}, dino_checkpoint.StopSignals())
    for epoch in range(3):
        checkpoints.save_epoch_end(epoch)
    assert written == [("checkpoint0000.pth", {"epoch": 1}), ("checkpoint.pth", {"epoch": 1}),
                       ("checkpoint.pth", {"epoch": 2}),
                       ("checkpoint0002.pth", {"epoch": 3}), ("checkpoint.pth", {"epoch": 3})]


# ------------------------------------------------------------------------------------------------
# Reading checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_checkpoint_names_the_file_without_weights_only_advice(tmp_path, damage):
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"w": torch.randn(1000)}, "args": argparse.Namespace(a=1)}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:  # the first opcodes of the pickled dict
        with zipfile.ZipFile(path) as archive:
            entry = next(e for e in archive.infolist() if e.filename.endswith("data.pkl"))
        start = entry.header_offset + 30 + len(entry.filename) + len(entry.extra)
        for k in range(start, start + 40):
            data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(utils.InputError) as error:
        utils.load_checkpoint_file(str(path))
    message = str(error.value)
    assert message.startswith(f"cannot read checkpoint {str(path)!r}: the file is truncated or "
                              "corrupt (")
    assert "weights_only" not in message and "\n" not in message


def test_resuming_with_other_model_flags_names_both(tmp_path):
    saved = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=256, use_bn_in_head=False)
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=256, use_bn_in_head=False)
    with pytest.raises(utils.InputError) as error:
        dino_checkpoint.check_same_model_flags(saved, args, "out/checkpoint.pth")
    assert str(error.value) == ("out/checkpoint.pth was written by a run with --arch vit_tiny "
                                "--patch_size 8, but this run has --arch vit_small --patch_size "
                                "16: resume it with its own flags, or choose another --output_dir")
    dino_checkpoint.check_same_model_flags(saved, saved, "out/checkpoint.pth")


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    state = {"model": nn.Linear(3, 2).state_dict()}
    with pytest.raises(utils.InputError) as error:
        utils.restore_objects(state, "ckpt.pth", model=nn.Linear(4, 2))
    assert "'model' in 'ckpt.pth' does not fit the model built from the flags (1 tensors " \
           "differ, e.g. size mismatch for weight" in str(error.value)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Data: bad files, 16-bit images, per-sample randomness, resumable sampler, worker errors
# ------------------------------------------------------------------------------------------------

def write_images(folder, count, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")


def test_each_unreadable_file_is_counted_once(tmp_path):
    write_images(tmp_path, 6)
    for name in ("02.png", "03.png"):  # two neighbours: the first used to count both
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    dataset = utils.ImageFiles(str(tmp_path), lambda image: np.asarray(image)[0, 0, 0])
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(skipped for _, skipped in items) == 2
    assert [value for value, _ in items] == [0, 10, 40, 40, 40, 50]


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = utils.open_rgb(str(tmp_path / "deep.png"))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(rgb)[0, :, 1].tolist() == [0, 1, 128, 255]


def test_augmentation_draws_depend_on_seed_epoch_and_index_only(tmp_path):
    write_images(tmp_path, 3, size=40)
    transform = main_dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 24, 12)
    dataset = utils.ImageFiles(str(tmp_path), transform, seed=7)
    key = utils.SampleKey(index=1, epoch=3)
    torch.manual_seed(0)
    random.seed(0)
    first, _ = dataset[key]
    state = (torch.get_rng_state(), random.getstate())
    torch.manual_seed(123)  # another history of the caller's streams
    random.seed(456)
    again, _ = dataset[key]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(dataset[utils.SampleKey(index=1, epoch=4)][0][0], first[0])
    assert not torch.equal(utils.ImageFiles(str(tmp_path), transform, seed=8)[key][0][0],
                           first[0])
    torch.manual_seed(0)
    random.seed(0)
    dataset[key]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]


def test_resumable_sampler_keeps_the_order_in_whole_steps_from_any_sample(
        single_process_group):
    dataset = list(range(23))
    reference = torch.utils.data.DistributedSampler(dataset, shuffle=True)
    sampler = utils.ResumableSampler(dataset, samples_per_step=4)
    for epoch in (0, 2):
        reference.set_epoch(epoch)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == len(sampler) == 20  # whole steps of 4
        assert keys == [utils.SampleKey(index, epoch) for index in list(reference)[:20]]
    sampler.set_epoch(2, first_sample=8)
    assert len(sampler) == 12 and list(sampler) == keys[8:]


class UnreadableFolder(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise utils.InputError("32 consecutive images from 'x.png' on could not be read: is the "
                               "data folder corrupt?")


def test_a_worker_error_is_the_same_one_line_as_in_the_main_process(capsys):
    def main(args):
        for _ in torch.utils.data.DataLoader(UnreadableFolder(), num_workers=args.workers):
            pass

    for workers in (0, 1):
        with pytest.raises(SystemExit) as exit_info:
            utils.run_cli(main, argparse.Namespace(workers=workers))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].endswith("error: 32 consecutive images from 'x.png' on could not be "
                                  "read: is the data folder corrupt?"), lines
        assert len(lines) == 1


def test_python_random_is_seeded_by_the_seed():
    utils.fix_random_seeds(3)
    first = random.random()
    utils.fix_random_seeds(3)
    assert random.random() == first


# ------------------------------------------------------------------------------------------------
# Random states, signals, lost processes
# ------------------------------------------------------------------------------------------------

def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    dino_checkpoint.seed_epoch(5, 2)
    torch.rand(3), np.random.rand(2), random.random()
    path = str(tmp_path / "states.pth")
    torch.save({"states": dino_checkpoint.random_states()}, path)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    dino_checkpoint.seed_epoch(0, 0)
    states = torch.load(path, weights_only=True)["states"]
    dino_checkpoint.restore_random_states(states)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_stop_signal_is_noted_then_a_second_one_stops_at_once(capfd):
    handed_over = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed_over.append(signum))
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        stop = dino_checkpoint.StopSignals().install()
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested() and stop.signum == signal.SIGUSR2
        assert "SIGUSR2 received: saving a checkpoint" in capfd.readouterr().err
        stopped = stop.stop("at epoch 1, iteration 5")
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGUSR2)
        assert exit_info.value.code == 128 + signal.SIGUSR2
        stop.uninstall()
        assert str(stopped) == ("Stopped by SIGUSR2 at epoch 1, iteration 5; checkpoint.pth "
                                "holds the run: run the same command again to resume it.")
        assert stopped.exit_status == 128 + signal.SIGUSR2
        stopped.pass_on()  # e.g. submitit's requeue handler
        assert handed_over == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) == sigterm_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_lost_process_message(monkeypatch):
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    timeout = RuntimeError("[/x/gloo/unbound_buffer.cc:129] Timed out waiting 6000ms for send "
                           "operation to complete")
    message = dino_checkpoint.lost_process_message(timeout, 0.1)
    assert message.startswith("rank 0: another process did not answer within "
                              "--dist_timeout_minutes 0.1 or closed its connection")
    assert dino_checkpoint.lost_process_message(RuntimeError("shape mismatch"), 10) is None


# ------------------------------------------------------------------------------------------------
# Flags and --init_from
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr must be positive (got -1.0)"),
    (["--out_dim", "0"], "--out_dim must be positive (got 0)"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be positive (got 0)"),
    (["--grad_accum_steps", "0"], "--grad_accum_steps must be positive (got 0)"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--saveckp_iters", "-1"], "--saveckp_iters must be 0 or more (got -1)"),
    (["--init_from", "/no/such/file.pth"], "--init_from '/no/such/file.pth' is not a file"),
    (["--epochs", "2", "--warmup_teacher_temp_epochs", "3"],
     "--warmup_teacher_temp_epochs (3) is longer than --epochs (2): lower it"),
])
def test_bad_flags_are_refused_in_one_line(flags, message):
    args = main_dino.get_args_parser().parse_args(["--warmup_epochs", "0", *flags])
    with pytest.raises(utils.InputError) as error:
        main_dino.check_flags(args)
    assert str(error.value) == message


def test_crops_that_are_not_whole_patches_are_named(capsys):
    args = main_dino.get_args_parser().parse_args(
        ["--patch_size", "7", "--global_crops_size", "32", "--local_crops_size", "14",
         "--warmup_epochs", "0"])
    main_dino.check_flags(args)
    assert capsys.readouterr().out == (
        "Warning: --global_crops_size 32 is not a multiple of --patch_size 7: the ViT ignores "
        "the last 4 rows and columns of pixels of every global crop (use 28 or 35).\n")


def tiny_wrappers(out_dim=16):
    torch.manual_seed(0)
    student = utils.MultiCropWrapper(vits.vit_tiny(patch_size=8),
                                     vits.DINOHead(192, out_dim, hidden_dim=32, bottleneck_dim=8))
    teacher = utils.MultiCropWrapper(vits.vit_tiny(patch_size=8),
                                     vits.DINOHead(192, out_dim, hidden_dim=32, bottleneck_dim=8))
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def test_init_from_a_reference_layout_backbone_keeps_fresh_heads(tmp_path):
    released = vits.vit_tiny(patch_size=8)  # a backbone-only state_dict without prefixes
    path = str(tmp_path / "dino_vittiny8_pretrain.pth")
    torch.save(released.state_dict(), path)
    student, teacher = tiny_wrappers()
    head_before = {k: v.clone() for k, v in student.head.state_dict().items()}
    center = torch.zeros(1, 16)
    assert dino_checkpoint.initialise_from(path, student, teacher, center) is False
    for wrapper in (student, teacher):
        for name, value in released.state_dict().items():
            assert torch.equal(wrapper.backbone.state_dict()[name], value), name
        for name, value in head_before.items():
            assert torch.equal(wrapper.head.state_dict()[name], value), name
    other_patch = [utils.MultiCropWrapper(vits.vit_tiny(patch_size=16), nn.Identity())
                   for _ in range(2)]
    with pytest.raises(utils.InputError, match="does not fit the model: pos_embed"):
        dino_checkpoint.initialise_from(path, *other_patch, center)


def test_init_from_a_main_dino_checkpoint_takes_heads_and_center(tmp_path):
    source_student, source_teacher = tiny_wrappers()
    with torch.no_grad():
        for param in source_teacher.parameters():
            param.add_(1.0)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"student": {f"module.{k}": v for k, v in source_student.state_dict().items()},
                "teacher": source_teacher.state_dict(), "epoch": 7,
                "dino_loss": {"center": torch.full((1, 16), 0.5)}}, path)
    student, teacher = tiny_wrappers()
    for wrapper in (student, teacher):
        for param in wrapper.parameters():
            nn.init.zeros_(param)
    center = torch.zeros(1, 16)
    assert dino_checkpoint.initialise_from(path, student, teacher, center) is True
    for got, want in ((student, source_student), (teacher, source_teacher)):
        for name, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[name], value), name
    assert torch.equal(center, torch.full((1, 16), 0.5))
    other_out_dim = tiny_wrappers(out_dim=32)
    assert dino_checkpoint.initialise_from(path, *other_out_dim, torch.zeros(1, 32)) is False


def test_frozen_backbone_gets_no_gradient_and_heads_do():
    student, _ = tiny_wrappers()
    student(torch.randn(2, 3, 16, 16)).sum().backward()
    utils.cancel_gradients_backbone(0, student, freeze_backbone_epochs=1)
    assert all(p.grad is None for p in student.backbone.parameters())
    assert all(p.grad is not None for p in student.head.mlp.parameters())
    student(torch.randn(2, 3, 16, 16)).sum().backward()
    utils.cancel_gradients_backbone(1, student, freeze_backbone_epochs=1)
    assert student.backbone.cls_token.grad is not None


# ------------------------------------------------------------------------------------------------
# End to end: kills, signals and resumes give the uninterrupted run's weights, bit for bit
# ------------------------------------------------------------------------------------------------

RESUME_RUN = resume_check.TINY_RUN  # with --saveckp_iters 4 and 2 DataLoader workers
ITERS_PER_EPOCH, ITERS = 6, 12  # 48 images / 8 per batch, 2 epochs


def run_stopping(data, output_dir, *extra, stop_at=-1, how="SIGKILL"):
    flags = ["--data_path", str(data), "--output_dir", str(output_dir), *RESUME_RUN, *extra]
    return resume_check.run_stopping(flags, stop_at, how)


@pytest.fixture(scope="module")
def digits_48(tmp_path_factory):
    from sample_data import write_digits_folder

    return write_digits_folder(str(tmp_path_factory.mktemp("digits48")), size=32, limit=48)


@pytest.fixture(scope="module")
def uninterrupted(digits_48, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_stopping(digits_48, output_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return output_dir


def assert_same_run(output_dir, reference_dir):
    """Bit-identical weights, optimizer state, center and log lines."""
    got = utils.load_checkpoint_file(str(output_dir / "checkpoint.pth"))
    want = utils.load_checkpoint_file(str(reference_dir / "checkpoint.pth"))
    assert list(got) == list(want) == ["student", "teacher", "optimizer", "epoch", "args",
                                       "dino_loss"]
    for key in ("student", "teacher", "dino_loss"):
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), (key, name)
    for index, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)
    assert (output_dir / "log.txt").read_text() == (reference_dir / "log.txt").read_text()
    assert not [name for name in os.listdir(output_dir) if ".tmp" in name]


@pytest.mark.slow
def test_killed_at_a_random_iteration_resumes_bit_identical(digits_48, uninterrupted, tmp_path):
    kill_at = random.Random().randrange(ITERS - 1)
    killed = run_stopping(digits_48, tmp_path, stop_at=kill_at, how="SIGKILL")
    assert killed.returncode == -signal.SIGKILL, f"kill at iteration {kill_at}"
    # Checkpoints after every 4th iteration (--saveckp_iters) and at each epoch's end.
    saved = [done for done in range(1, kill_at + 1) if done % 4 == 0 or done % ITERS_PER_EPOCH == 0]
    resumed = run_stopping(digits_48, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if saved:
        epoch, iteration = divmod(saved[-1], ITERS_PER_EPOCH)
        assert f"Found checkpoint at {tmp_path / 'checkpoint.pth'}" in resumed.stdout
        if iteration:
            assert f"Resuming epoch {epoch} at iteration {iteration}." in resumed.stdout, kill_at
            assert f"Epoch: [{epoch}/2]  [{iteration}/6]" in resumed.stdout  # first line shown
        assert f"Epoch: [{epoch}/2]  [{iteration - 1}/6]" not in resumed.stdout
        assert kill_at + 1 - saved[-1] <= 4  # iterations lost by the kill
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_stops_cleanly(digits_48, tmp_path):
    stopped = run_stopping(digits_48, tmp_path, stop_at=7, how="SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM
    assert stopped.stdout.strip().splitlines()[-1] == (
        "Stopped by SIGTERM at epoch 1, iteration 2; checkpoint.pth holds the run: run the same "
        "command again to resume it.")
    assert stopped.stderr == ("SIGTERM received: saving a checkpoint at the end of this "
                              "iteration, then stopping (send it again to stop at once).\n")
    checkpoint = utils.load_checkpoint_file(str(tmp_path / "checkpoint.pth"))
    assert list(checkpoint) == ["student", "teacher", "optimizer", "epoch", "args", "dino_loss",
                                "mid_epoch"]
    assert checkpoint["epoch"] == 1 and checkpoint["mid_epoch"]["ranks"][0]["iteration"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint0000.pth", "curves.png",
                                          "log.txt"]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_workers_stops_in_one_line(digits_48, tmp_path):
    stopped = run_stopping(digits_48, tmp_path, stop_at=1, how="group:SIGINT")
    assert stopped.returncode == 130
    assert stopped.stdout.strip().splitlines()[-1].startswith(
        "Stopped by Ctrl-C at epoch 0, iteration 2;")
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert utils.load_checkpoint_file(
        str(tmp_path / "checkpoint.pth"))["mid_epoch"]["ranks"][0]["iteration"] == 2


@pytest.mark.slow
def test_init_from_a_reference_backbone_warms_up_fresh_heads(digits_48, tmp_path):
    torch.manual_seed(3)
    released = vits.vit_tiny(patch_size=8).state_dict()  # the reference's released layout
    torch.save(released, tmp_path / "backbone.pth")
    run = run_stopping(digits_48, tmp_path / "out", "--epochs", "1", "--warmup_epochs", "0",
                       "--init_from", str(tmp_path / "backbone.pth"),
                       "--freeze_backbone_epochs", "1", "--freeze_last_layer", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the heads start from random weights" in run.stdout
    checkpoint = utils.load_checkpoint_file(str(tmp_path / "out" / "checkpoint.pth"))
    assert checkpoint["epoch"] == 1
    for name, value in released.items():  # the backbones stayed frozen
        assert torch.equal(checkpoint["student"][f"module.backbone.{name}"], value), name
        # m * t + (1 - m) * t rounds to t within a few ulps
        torch.testing.assert_close(checkpoint["teacher"][f"backbone.{name}"], value, rtol=1e-6,
                                   atol=1e-7)
    # The heads trained: the student's moved away from the teacher's (which started equal).
    head = [name for name in checkpoint["teacher"] if name.startswith("head.")]
    assert head and all(not torch.equal(checkpoint["student"][f"module.{name}"],
                                        checkpoint["teacher"][name])
                        for name in head if not name.endswith("weight_g"))  # g is frozen at 1
    # A fresh optimizer that stepped the heads once per iteration, never the backbone.
    steps = [int(state["step"]) for state in checkpoint["optimizer"]["state"].values()]
    assert steps == [ITERS_PER_EPOCH] * (len(head) - 1)


FROZEN_RANK_RUNNER = """
import os, signal, socket, subprocess, sys, time
flags = sys.argv[1:]
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
ranks = []
for rank in range(2):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks.append(subprocess.Popen([sys.executable, "main_dino.py", *flags], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
for line in ranks[0].stdout:
    sys.stdout.write(line)
    if line.startswith("Epoch: [0/2]  [0/"):
        os.kill(ranks[1].pid, signal.SIGSTOP)
ranks[0].wait()
ranks[1].kill()
os.kill(ranks[1].pid, signal.SIGCONT)
ranks[1].wait()
sys.exit(ranks[0].returncode)
"""


@pytest.mark.slow
def test_a_frozen_rank_ends_the_others_with_one_line(digits_48, tmp_path):
    command = [sys.executable, "-c", FROZEN_RANK_RUNNER, "--data_path", str(digits_48),
               "--output_dir", str(tmp_path), *RESUME_RUN, "--batch_size_per_gpu", "4",
               "--num_workers", "0", "--dist_timeout_minutes", "0.05"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("rank 0: another process did not answer within "
                           "--dist_timeout_minutes 0.05 or closed its connection"), last
    assert "Traceback" not in result.stdout
