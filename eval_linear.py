"""Linear probe: a linear classifier trained on the frozen backbone's features."""
import argparse
import functools
import os
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torchvision import transforms

import utils
import vision_transformer as vits

TRAIN_PRINT_FREQ = 20
VAL_PRINT_FREQ = 20
# Frozen backbone features of an image batch, as the classifier takes them.
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with linear classification on frozen features")
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="Concatenate the [CLS] tokens of the last n blocks (4 for vit_small, "
                             "1 for vit_base in the reference evaluations).")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="Also use the mean patch token of the last block, interleaved with "
                             "the [CLS] features (false for vit_small, true for vit_base); needs "
                             "--n_last_blocks 1.")
    utils.add_eval_backbone_args(parser)
    parser.add_argument("--epochs", default=100, type=int, help="Number of training epochs.")
    parser.add_argument("--lr", default=0.001, type=float,
                        help="Learning rate for a total batch of 256, scaled linearly with the "
                             "actual total batch; cosine-annealed to 0 per epoch.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int,
                        help="Images per GPU (or per process).")
    utils.add_distributed_args(parser)
    utils.add_eval_data_args(parser)
    parser.add_argument("--val_freq", default=1, type=int,
                        help="Validate every val_freq epochs (and after the last one).")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Where log.txt and checkpoint.pth.tar go (created if missing); a "
                             "checkpoint found there is resumed.")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="Number of classifier outputs (default: the number of class "
                             "folders found).")
    parser.add_argument("--evaluate", nargs="?", const="", default=None,
                        metavar="LINEAR_CHECKPOINT",
                        help="Only validate: with a path, the linear weights of that checkpoint "
                             "(e.g. a checkpoint.pth.tar of this script); alone, the reference "
                             "linear weights for --arch/--patch_size (downloaded).")
    return parser


class LinearClassifier(nn.Module):
    """One linear layer on flattened features; weights ~ N(0, 0.01), zero bias."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.size(0), -1))


def vit_linear_features(blocks_output: List[torch.Tensor], avgpool: bool) -> torch.Tensor:
    """[CLS] of each block output (shallow to deep), concatenated.

    With avgpool, the last block's mean patch token is interleaved with them as
    [cls_0, avg_0, cls_1, avg_1, ...]: the reference linear weights expect this order.
    """
    output = torch.cat([tokens[:, 0] for tokens in blocks_output], dim=-1)
    if avgpool:
        patch_mean = blocks_output[-1][:, 1:].mean(dim=1)
        output = torch.stack((output, patch_mean), dim=-1).reshape(len(output), -1)
    return output


@torch.no_grad()
def frozen_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int,
                    avgpool: bool) -> torch.Tensor:
    if isinstance(model, vits.VisionTransformer):
        return vit_linear_features(model.get_intermediate_layers(images, n_last_blocks), avgpool)
    return model(images)


def linear_input_dim(model: nn.Module, embed_dim: int, n_last_blocks: int, avgpool: bool) -> int:
    if not isinstance(model, vits.VisionTransformer):
        return embed_dim
    if avgpool and n_last_blocks != 1:
        raise utils.InputError("--avgpool_patchtokens true interleaves the mean patch token with "
                               "one [CLS] token: use it with --n_last_blocks 1")
    return embed_dim * (n_last_blocks + int(avgpool))


def train_transform(crop_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])


def build_classifier(dim: int, num_labels: int, args: argparse.Namespace,
                     device: torch.device) -> nn.Module:
    classifier = LinearClassifier(dim, num_labels).to(device)
    device_ids = [args.gpu] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(classifier, device_ids=device_ids)


def resolve_num_labels(requested, classes: List[str]) -> int:
    if requested is None:
        return len(classes)
    if requested < len(classes):
        raise utils.InputError(f"--num_labels {requested} is less than the {len(classes)} class "
                               "folders found")
    return requested


def load_linear_weights(linear_classifier: nn.Module, path: str, arch: str,
                        patch_size: int) -> None:
    """Load a linear checkpoint (local file, or the reference release when path is empty)."""
    if path:
        if not os.path.isfile(path):
            raise utils.InputError(f"--evaluate {path!r} is not a file")
        checkpoint, source = utils.load_checkpoint_file(path), path
    else:
        source = utils.reference_weights_url(arch, patch_size, kind="linear")
        if source is None:
            raise utils.InputError(f"no reference linear weights exist for {arch} with patch "
                                   f"{patch_size}: pass a linear checkpoint, e.g. --evaluate "
                                   "OUTPUT_DIR/checkpoint.pth.tar")
        checkpoint = utils.download_state_dict(source)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {key.replace("module.", ""): value for key, value in state_dict.items()}
    model_state = linear_classifier.module.state_dict()
    for key, expected in model_state.items():
        found = state_dict.get(key)
        if found is None or found.shape != expected.shape:
            found_shape = None if found is None else tuple(found.shape)
            raise utils.InputError(
                f"{source!r} does not fit the linear classifier: {key} is {found_shape}, expected "
                f"{tuple(expected.shape)} (check --arch, --n_last_blocks, --avgpool_patchtokens "
                "and --num_labels)")
    linear_classifier.module.load_state_dict(state_dict, strict=True)
    print(f"Linear classifier weights loaded from {source}")


def train_one_epoch(linear_classifier: nn.Module, optimizer: torch.optim.Optimizer, loader,
                    epoch: int, features: FeatureFn, device: torch.device) -> Dict[str, float]:
    linear_classifier.train()
    criterion = nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    for images, targets in metric_logger.log_every(loader, TRAIN_PRINT_FREQ, f"Epoch: [{epoch}]"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = criterion(linear_classifier(features(images)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.item())
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


@torch.no_grad()
def validate_network(loader, linear_classifier: nn.Module, features: FeatureFn,
                     device: torch.device) -> Dict[str, float]:
    """Loss, acc1 and (with 5 or more labels) acc5 averaged over images; every rank sees all."""
    linear_classifier.eval()
    criterion = nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter="  ")
    with_top5 = linear_classifier.module.num_labels >= 5
    for images, targets in metric_logger.log_every(loader, VAL_PRINT_FREQ, "Test:"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        output = linear_classifier(features(images))
        accuracies = utils.accuracy(output, targets, topk=(1, 5) if with_top5 else (1,))
        batch_size = len(images)
        metric_logger.meters["loss"].update(criterion(output, targets).item(), n=batch_size)
        metric_logger.meters["acc1"].update(accuracies[0].item(), n=batch_size)
        if with_top5:
            metric_logger.meters["acc5"].update(accuracies[1].item(), n=batch_size)
    meters = metric_logger.meters
    top5 = f" Acc@5 {meters['acc5'].global_avg:.3f}" if with_top5 else ""
    print(f"* Acc@1 {meters['acc1'].global_avg:.3f}{top5} loss {meters['loss'].global_avg:.3f}")
    return {name: meter.global_avg for name, meter in meters.items()}


def eval_linear(args: argparse.Namespace) -> None:
    """Train the linear probe (resuming from output_dir), or with --evaluate only validate."""
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    utils.print_run_header(args)
    val_set = utils.image_folder(args.data_path, "val",
                                 utils.eval_transform(args.resize_size, args.crop_size))
    train_set = None
    if args.evaluate is None:
        train_set = utils.image_folder(args.data_path, "train", train_transform(args.crop_size))
        utils.check_same_classes(train_set, val_set)
        print(f"Data loaded with {len(train_set)} train and {len(val_set)} val imgs.")
    device = utils.device_of(args)
    model, embed_dim = utils.build_frozen_backbone(args.arch, args.patch_size,
                                                   args.pretrained_weights, args.checkpoint_key,
                                                   device)
    dim = linear_input_dim(model, embed_dim, args.n_last_blocks, args.avgpool_patchtokens)
    classifier = build_classifier(dim, resolve_num_labels(args.num_labels, val_set.classes),
                                  args, device)
    features = functools.partial(frozen_features, model, n_last_blocks=args.n_last_blocks,
                                 avgpool=args.avgpool_patchtokens)
    val_loader = utils.eval_loader(val_set, args)
    if args.evaluate is not None:
        load_linear_weights(classifier, args.evaluate, args.arch, args.patch_size)
        test_stats = validate_network(val_loader, classifier, features, device)
        print(f"Accuracy of the network on the {len(val_set)} test images: "
              f"{test_stats['acc1']:.1f}%")
        return
    train_loader = utils.eval_loader(train_set, args,
                                     torch.utils.data.DistributedSampler(train_set, shuffle=True))
    train_linear(classifier, features, train_loader, val_loader, device, args)


def train_linear(classifier: nn.Module, features: FeatureFn, train_loader, val_loader,
                 device: torch.device, args: argparse.Namespace) -> None:
    """SGD on the classifier for --epochs with cosine annealing, validating every --val_freq."""
    total_batch = args.batch_size_per_gpu * utils.get_world_size()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr * total_batch / 256.0,
                                momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)

    to_restore = {"epoch": 0, "best_acc": 0.0}
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    utils.restart_from_checkpoint(checkpoint_path, run_variables=to_restore,
                                  state_dict=classifier, optimizer=optimizer, scheduler=scheduler)
    start_epoch, best_acc = to_restore["epoch"], to_restore["best_acc"]
    log_path = os.path.join(args.output_dir, "log.txt")
    utils.truncate_json_log(log_path, start_epoch)
    num_val_images = len(val_loader.dataset)

    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(classifier, optimizer, train_loader, epoch, features, device)
        scheduler.step()
        log_stats = {**{f"train_{name}": value for name, value in train_stats.items()},
                     "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validate_network(val_loader, classifier, features, device)
            print(f"Accuracy at epoch {epoch} of the network on the {num_val_images} test "
                  f"images: {test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats["acc1"])
            print(f"Max accuracy so far: {best_acc:.2f}%")
            log_stats.update({f"test_{name}": value for name, value in test_stats.items()})
        utils.append_json_line(log_path, log_stats)
        utils.save_on_master({
            "epoch": epoch + 1,
            "state_dict": classifier.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_acc": best_acc,
        }, checkpoint_path)
    print("Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {best_acc:.1f}")


def main(args: argparse.Namespace) -> None:
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    eval_linear(args)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
