"""Weighted k-NN classification on frozen, L2-normalised features (DINO's k-NN evaluation)."""
import argparse
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets

import utils

FEATURE_FILES = ("trainfeat", "testfeat", "trainlabels", "testlabels")
# Entries of one (test chunk x train bank) similarity block: 256 MB of float32, so a 1.28M-image
# bank is compared against ~50 test images at a time.
SIMILARITY_BLOCK = 2 ** 26


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on frozen features")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int,
                        help="Images per GPU (or per process) during feature extraction.")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Numbers of nearest neighbours to evaluate; 20 usually does best.")
    parser.add_argument("--temperature", default=0.07, type=float,
                        help="Temperature T of the voting weights exp(similarity / T).")
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="Keep the feature bank on the GPU; set to false on out-of-memory "
                             "errors. Ignored without CUDA.")
    utils.add_eval_backbone_args(parser)
    parser.add_argument("--dump_features", default=None,
                        help="Folder to save the features and labels in (trainfeat.pth, "
                             "testfeat.pth, trainlabels.pth, testlabels.pth).")
    parser.add_argument("--load_features", default=None,
                        help="Folder of previously dumped features: skips the extraction.")
    utils.add_eval_data_args(parser)
    utils.add_distributed_args(parser)
    return parser


class ReturnIndexDataset(datasets.ImageFolder):
    """ImageFolder yielding (image, index): rows land in place whatever rank extracted them."""

    def __getitem__(self, index: int):
        image, _ = super().__getitem__(index)
        return image, index


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0."""
    if utils.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(utils.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(model: nn.Module, data_loader, device: torch.device,
                     storage_device: torch.device, print_freq: int = 10
                     ) -> Optional[torch.Tensor]:
    """(dataset size, D) features in dataset order on rank 0; None on other ranks.

    Every rank gets the same number of batches of the same size (the sampler pads), so the
    all-gather shapes match; padded duplicates simply rewrite the same row.
    """
    metric_logger = utils.MetricLogger(delimiter="  ")
    features = None
    for samples, index in metric_logger.log_every(data_loader, print_freq):
        batch_features = model(samples.to(device, non_blocking=True)).float()
        batch_features = gather_from_ranks(batch_features)
        index = gather_from_ranks(index.to(device))
        if not utils.is_main_process():
            continue
        if features is None:
            features = torch.zeros(len(data_loader.dataset), batch_features.shape[-1],
                                   device=storage_device)
            print(f"Storing features into tensor of shape {tuple(features.shape)}")
        features.index_copy_(0, index.to(storage_device), batch_features.to(storage_device))
    return features


def dataset_labels(dataset: datasets.ImageFolder) -> torch.Tensor:
    return torch.tensor([label for _, label in dataset.samples], dtype=torch.long)


def build_loader(dataset, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """Each rank extracts its share of the images, in dataset order (all of them without a
    process group)."""
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) \
        if utils.is_dist_avail_and_initialized() else None
    return utils.eval_loader(dataset, args, sampler)


def load_datasets(data_path: str, resize_size: int, crop_size: int, ks: Sequence[int]
                  ) -> Tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The train/ and val/ class folders of data_path; any problem with them is an InputError."""
    transform = utils.eval_transform(resize_size, crop_size)
    train_set = utils.image_folder(data_path, "train", transform, ReturnIndexDataset)
    test_set = utils.image_folder(data_path, "val", transform, ReturnIndexDataset)
    utils.check_same_classes(train_set, test_set)
    check_knn_args(ks, len(train_set))
    return train_set, test_set


def compute_feature_bank(model: nn.Module, train_set: datasets.ImageFolder,
                         test_set: datasets.ImageFolder, args: argparse.Namespace,
                         device: torch.device, storage_device: torch.device,
                         print_freq: int = 10) -> Optional[Dict[str, torch.Tensor]]:
    """Normalised train/test features and labels, keyed by file stem (rank 0; None elsewhere)."""
    print("Extracting features for train set...")
    train_features = extract_features(model, build_loader(train_set, args), device,
                                      storage_device, print_freq)
    print("Extracting features for val set...")
    test_features = extract_features(model, build_loader(test_set, args), device,
                                     storage_device, print_freq)
    if not utils.is_main_process():
        return None
    return {  # normalised in place: a second copy of a 1.28M-image bank would need 2 GB more
        "trainfeat": F.normalize(train_features, dim=1, p=2, out=train_features),
        "testfeat": F.normalize(test_features, dim=1, p=2, out=test_features),
        "trainlabels": dataset_labels(train_set).to(storage_device),
        "testlabels": dataset_labels(test_set).to(storage_device),
    }


def extract_feature_bank(args: argparse.Namespace, storage_device: torch.device
                         ) -> Optional[Dict[str, torch.Tensor]]:
    """The feature bank of --pretrained_weights on --data_path (rank 0; None elsewhere)."""
    train_set, test_set = load_datasets(args.data_path, args.resize_size, args.crop_size,
                                        args.nb_knn)
    print(f"Data loaded with {len(train_set)} train and {len(test_set)} val imgs.")
    device = utils.device_of(args)
    model, _ = utils.build_frozen_backbone(args.arch, args.patch_size, args.pretrained_weights,
                                           args.checkpoint_key, device)
    return compute_feature_bank(model, train_set, test_set, args, device, storage_device)


def pixel_feature_bank(splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
                       ) -> Dict[str, torch.Tensor]:
    """Raw pixels as features: each image of {"train"|"val": (images, labels)} flattened and
    L2-normalised, in the layout of extract_feature_bank."""
    bank = {}
    for prefix, (images, labels) in (("train", splits["train"]), ("test", splits["val"])):
        pixels = torch.tensor(images.reshape(len(images), -1), dtype=torch.float)
        bank[f"{prefix}feat"] = F.normalize(pixels, dim=1)
        bank[f"{prefix}labels"] = torch.tensor(labels, dtype=torch.long)
    return bank


def dump_feature_bank(bank: Dict[str, torch.Tensor], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, tensor in bank.items():
        torch.save(tensor.cpu(), os.path.join(folder, f"{name}.pth"))
    print(f"Features and labels saved in {folder}")


def load_feature_bank(folder: str, storage_device: torch.device, ks: Sequence[int]
                      ) -> Dict[str, torch.Tensor]:
    paths = {name: os.path.join(folder, f"{name}.pth") for name in FEATURE_FILES}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise utils.InputError(f"--load_features {folder!r} lacks {', '.join(missing)} (written "
                               "by a run with --dump_features)")
    bank = {name: torch.load(path, map_location="cpu").to(storage_device)
            for name, path in paths.items()}
    check_knn_args(ks, len(bank["trainfeat"]))
    return bank


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor,
                   test_features: torch.Tensor, test_labels: torch.Tensor, ks: Sequence[int],
                   temperature: float, num_classes: int,
                   similarity_block: int = SIMILARITY_BLOCK) -> Dict[int, Tuple[float, float]]:
    """{k: (top-1 %, top-5 %)} of weighted k-NN voting; each neighbour adds exp(sim / T).

    Test images are compared with the whole bank in chunks of at most `similarity_block`
    similarities. The neighbours are found once for the largest k (sorted), so every k reuses
    them. Top-5 looks at the first min(5, k) classes that received votes.
    """
    max_k = max(ks)
    chunk_size = max(1, similarity_block // len(train_features))
    hits = {k: torch.zeros(2, dtype=torch.long, device=test_labels.device) for k in ks}
    for start in range(0, len(test_features), chunk_size):
        targets = test_labels[start:start + chunk_size]
        similarity = test_features[start:start + chunk_size] @ train_features.T
        top_similarity, top_index = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[top_index]
        weights = (top_similarity / temperature).exp()
        for k in ks:
            scores = torch.zeros(len(targets), num_classes, device=weights.device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top_scores, predictions = scores.topk(min(5, k), dim=1)
            correct = (predictions == targets[:, None]) & (top_scores > 0)
            hits[k] += torch.stack((correct[:, 0].sum(), correct.any(dim=1).sum()))
    return {k: tuple(100.0 * count / len(test_labels) for count in counts.tolist())
            for k, counts in hits.items()}


def bank_top1(bank: Dict[str, torch.Tensor], k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN top-1 (%) of a feature bank's test features against its train features."""
    num_classes = int(max(bank["trainlabels"].max(), bank["testlabels"].max())) + 1
    return knn_classifier(bank["trainfeat"], bank["trainlabels"], bank["testfeat"],
                          bank["testlabels"], [k], temperature, num_classes)[k][0]


def check_knn_args(ks: Sequence[int], bank_size: int) -> None:
    if min(ks) < 1:
        raise utils.InputError(f"--nb_knn values must be positive, got {list(ks)}")
    if max(ks) > bank_size:
        raise utils.InputError(f"--nb_knn {max(ks)} exceeds the {bank_size} training images: "
                               "pass smaller --nb_knn values")


class KnnMonitor:
    """main_dino's k-NN during training: weighted k-NN top-1 of a backbone being trained.

    The folders are read (and checked) once at start-up; each call extracts the features of
    data_path/train and data_path/val with the model as it is, on every rank, and votes on rank 0.
    Images are resized and center-cropped to `image_size`.
    """

    def __init__(self, data_path: str, image_size: int, args: argparse.Namespace, k: int = 20,
                 temperature: float = 0.07):
        self.train_set, self.test_set = load_datasets(data_path, image_size, image_size, [k])
        self.args = args  # batch_size_per_gpu and num_workers of the loaders
        self.k, self.temperature = k, temperature
        print(f"k-NN monitor: {len(self.train_set)} train and {len(self.test_set)} val images "
              f"of {len(self.train_set.classes)} classes in {data_path}.")

    @torch.no_grad()
    def top1(self, model: nn.Module, device: torch.device, autocast) -> Optional[float]:
        """k-NN top-1 (%) of `model`'s features (rank 0; None elsewhere); the model's mode is
        kept."""
        was_training = model.training
        model.eval()
        try:
            with autocast:
                bank = compute_feature_bank(model, self.train_set, self.test_set, self.args,
                                            device, device, print_freq=10 ** 9)
        finally:
            model.train(was_training)
        return None if bank is None else bank_top1(bank, self.k, self.temperature)


def main(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    utils.print_run_header(args)
    use_gpu_bank = args.use_cuda and torch.cuda.is_available()
    storage_device = utils.device_of(args) if use_gpu_bank else torch.device("cpu")
    if args.load_features:
        bank = load_feature_bank(args.load_features, storage_device, args.nb_knn) \
            if utils.is_main_process() else None
    else:
        bank = extract_feature_bank(args, storage_device)

    if utils.is_main_process():
        if args.dump_features and not args.load_features:
            dump_feature_bank(bank, args.dump_features)
        num_classes = int(max(bank["trainlabels"].max(), bank["testlabels"].max())) + 1
        print("Features are ready!\nStart the k-NN classification.")
        results = knn_classifier(bank["trainfeat"], bank["trainlabels"], bank["testfeat"],
                                 bank["testlabels"], args.nb_knn, args.temperature, num_classes)
        for k, (top1, top5) in results.items():
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    dist.barrier()


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
