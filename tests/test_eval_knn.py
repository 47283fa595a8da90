import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import eval_knn
import utils


def unit_vectors(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack((radians.cos(), radians.sin()), dim=1).float()


# Bank: class 0 at 0 deg, class 1 at 40 and 45 deg, class 2 at 180 deg.
BANK = unit_vectors([0.0, 40.0, 45.0, 180.0])
BANK_LABELS = torch.tensor([0, 1, 1, 2])
# Queries: at 0 deg (class 0), at 43 deg (class 1), at 150 deg labelled 0 (gets no class-0 vote).
QUERIES = unit_vectors([0.0, 43.0, 150.0])
QUERY_LABELS = torch.tensor([0, 1, 0])


@pytest.mark.parametrize("k,temperature,expected_top1,expected_top5", [
    # k=3, T=0.07. Query 0: class 0 gets exp(1/0.07) = 1.6e6, class 1 gets
    # exp(cos40/0.07) + exp(cos45/0.07) = 5.7e4 + 2.4e4: the single close neighbour wins (a
    # majority vote would say 1). Query 1: class 1 (cos2, cos3) beats class 0 (cos43). Query 2:
    # votes only for 2 and 1, so it misses top-1 and top-5. -> 2/3 and 2/3.
    (3, 0.07, 200 / 3, 200 / 3),
    # k=3, T=1. Query 0: class 0 gets e^1 = 2.72, class 1 gets e^0.766 + e^0.707 = 4.18, so the
    # prediction is 1, but class 0 is second: a top-5 hit. -> 1/3 and 2/3.
    (3, 1.0, 100 / 3, 200 / 3),
    # k=1 (< 5): top-5 looks at the single voted class. Nearest: 0 deg, 45 deg, 180 deg.
    (1, 0.07, 200 / 3, 200 / 3),
])
def test_weighted_voting_matches_hand_computation(k, temperature, expected_top1, expected_top5):
    results = eval_knn.knn_classifier(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, [k], temperature,
                                      num_classes=3)
    assert results[k] == pytest.approx((expected_top1, expected_top5))


def straightforward_knn(train_features, train_labels, test_features, test_labels, k,
                        temperature, num_classes):
    """Per query: full sort of the similarities, Python sums of exp(sim/T) per class."""
    top1 = top5 = 0
    for query, label in zip(test_features, test_labels.tolist()):
        similarities = (train_features @ query).tolist()
        order = sorted(range(len(similarities)), key=lambda i: -similarities[i])[:k]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(train_labels[i])] += math.exp(similarities[i] / temperature)
        ranked = sorted((c for c in range(num_classes) if scores[c] > 0), key=lambda c: -scores[c])
        top1 += ranked[0] == label
        top5 += label in ranked[:min(5, k)]
    return 100.0 * top1 / len(test_labels), 100.0 * top5 / len(test_labels)


@pytest.mark.parametrize("similarity_block", [1, 300 * 7, 10 ** 9])  # chunks of 1, 7, all
def test_chunked_voting_equals_straightforward_computation(similarity_block):
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    test = F.normalize(torch.randn(37, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 7, (300,), generator=generator)
    test_labels = torch.randint(0, 7, (37,), generator=generator)
    ks = [1, 4, 20, 100]
    results = eval_knn.knn_classifier(train, train_labels, test, test_labels, ks, 0.07, 7,
                                      similarity_block=similarity_block)
    for k in ks:
        expected = straightforward_knn(train, train_labels, test, test_labels, k, 0.07, 7)
        assert results[k] == pytest.approx(expected)


def test_dumped_features_round_trip(tmp_path):
    bank = {"trainfeat": F.normalize(torch.randn(6, 4), dim=1), "testfeat": torch.randn(2, 4),
            "trainlabels": torch.tensor([0, 1, 2, 0, 1, 2]), "testlabels": torch.tensor([1, 0])}
    eval_knn.dump_feature_bank(bank, str(tmp_path / "features"))
    assert sorted(os.listdir(tmp_path / "features")) == [
        "testfeat.pth", "testlabels.pth", "trainfeat.pth", "trainlabels.pth"]
    loaded = eval_knn.load_feature_bank(str(tmp_path / "features"), torch.device("cpu"), [6])
    assert loaded.keys() == bank.keys()
    for name, tensor in bank.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


def test_load_features_names_the_missing_files(tmp_path):
    torch.save(torch.zeros(3, 2), tmp_path / "trainfeat.pth")
    with pytest.raises(utils.InputError, match="testfeat.pth.*trainlabels.pth.*testlabels.pth"):
        eval_knn.load_feature_bank(str(tmp_path), torch.device("cpu"), [1])


def test_k_larger_than_the_bank_is_an_input_error():
    with pytest.raises(utils.InputError, match="--nb_knn 200 exceeds the 150 training images"):
        eval_knn.check_knn_args([10, 200], 150)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

KNN_LINE = re.compile(r"^(\d+)-NN classifier result: Top1: ([0-9.]+), Top5: ([0-9.]+)$", re.M)
SMALL_IMAGES = ["--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "32",
                "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]


def knn_results(stdout):
    return {int(k): (float(top1), float(top5)) for k, top1, top5 in KNN_LINE.findall(stdout)}


@pytest.fixture(scope="module")
def knn_run(run_script, digits_train_val, tiny_dino_checkpoint, tmp_path_factory):
    """One single-process run on the trained checkpoint that dumps its features."""
    dump_dir = str(tmp_path_factory.mktemp("knn") / "features")
    result = run_script("eval_knn.py", "--data_path", digits_train_val, *SMALL_IMAGES,
                        "--pretrained_weights", tiny_dino_checkpoint, "--nb_knn", "1", "3", "20",
                        "--dump_features", dump_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, dump_dir


@pytest.mark.slow
def test_knn_prints_results_that_match_its_dumped_features(knn_run, run_script):
    stdout, dump_dir = knn_run
    printed = knn_results(stdout)
    assert sorted(printed) == [1, 3, 20]
    bank = eval_knn.load_feature_bank(dump_dir, torch.device("cpu"), [20])
    assert bank["trainfeat"].shape == (150, 192) and bank["testfeat"].shape == (50, 192)
    assert torch.allclose(bank["trainfeat"].norm(dim=1), torch.ones(150))
    assert bank["testlabels"].tolist() == [label for label in range(10) for _ in range(5)]
    recomputed = eval_knn.knn_classifier(bank["trainfeat"], bank["trainlabels"],
                                         bank["testfeat"], bank["testlabels"], [1, 3, 20],
                                         0.07, 10)
    for k in (1, 3, 20):
        assert printed[k] == pytest.approx(recomputed[k])

    reloaded = run_script("eval_knn.py", "--load_features", dump_dir, "--nb_knn", "1", "3", "20",
                          "--data_path", "/nonexistent")
    assert reloaded.returncode == 0, reloaded.stderr
    assert knn_results(reloaded.stdout) == printed


@pytest.mark.slow
def test_knn_gathers_features_from_two_cpu_processes(knn_run, run_script, digits_train_val,
                                                     tiny_dino_checkpoint, tmp_path):
    _, single_dump = knn_run
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "eval_knn.py", "--data_path", digits_train_val, *SMALL_IMAGES,
                        "--pretrained_weights", tiny_dino_checkpoint, "--nb_knn", "3",
                        "--dump_features", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(knn_results(result.stdout)) == 1  # printed by rank 0 only
    single = eval_knn.load_feature_bank(single_dump, torch.device("cpu"), [3])
    gathered = eval_knn.load_feature_bank(str(tmp_path), torch.device("cpu"), [3])
    for name in eval_knn.FEATURE_FILES:
        assert torch.allclose(gathered[name].float(), single[name].float(), atol=1e-5), name


@pytest.mark.slow
def test_knn_missing_data_folder_is_a_clear_error(run_script, tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    result = run_script("eval_knn.py", "--data_path", str(tmp_path), *SMALL_IMAGES,
                        "--pretrained_weights", "random")
    assert result.returncode == 2
    assert f"{tmp_path / 'train'!s}' is not a folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_knn_checkpoint_of_another_architecture_is_a_clear_error(run_script, digits_train_val,
                                                                 tiny_dino_checkpoint):
    result = run_script("eval_knn.py", "--data_path", digits_train_val, "--arch", "vit_tiny",
                        "--patch_size", "16", "--num_workers", "0", "--nb_knn", "3",
                        "--pretrained_weights", tiny_dino_checkpoint)
    assert result.returncode == 2
    assert "does not fit the model: pos_embed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_random_weights_are_one_network_across_runs_and_ranks(run_script, digits_train_val,
                                                              tmp_path):
    """--pretrained_weights random is seeded: a rerun and each torchrun rank build the same net."""
    random_run = ["eval_knn.py", "--data_path", digits_train_val, *SMALL_IMAGES,
                  "--pretrained_weights", "random", "--nb_knn", "3", "--dump_features"]
    single = run_script(*random_run, str(tmp_path / "single"))
    assert single.returncode == 0, single.stdout + single.stderr
    ranks = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       *random_run, str(tmp_path / "ranks"))
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    assert knn_results(ranks.stdout) == knn_results(single.stdout)
    features = [torch.load(tmp_path / run / "trainfeat.pth") for run in ("single", "ranks")]
    torch.testing.assert_close(features[0], features[1], atol=1e-5, rtol=0)
