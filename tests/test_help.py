"""Every script's --help: each flag documented, its default shown once, the model names listed."""
import argparse
import re

import pytest

import main_ablation
import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import models_hpm
import models_vit

SCRIPTS = {"main_pretrain": main_pretrain, "main_finetune": main_finetune, "main_linprobe": main_linprobe,
           "main_knn": main_knn, "main_ablation": main_ablation}
EXPECTED_FLAGS = {
    "main_pretrain": ("--no-learning_loss", "--no-relative", "--amp", "--mask_regular", "--mask_block",
                      "--clip_grad", "--accum_iter", "--vis_mask_ratio", "--norm_pix_loss", "--compile",
                      "--teacher_decay_unit", "--teacher_half_life"),
    # its own flags, and every main_pretrain flag it passes through
    "main_ablation": ("--variants", "--variant", "--seeds", "--baseline", "--jobs", "--threads", "--cluster",
                      "--knn_k", "--probe_epochs", "--eval_model", "--data_path", "--model", "--epochs",
                      "--no-learning_loss", "--teacher_decay_unit", "--output_dir"),
    "main_finetune": ("--finetune", "--teacher", "--global_pool", "--cls_token", "--layer_decay", "--drop_path",
                      "--reprob", "--mixup", "--cutmix", "--smoothing", "--aa", "--eval", "--nb_classes",
                      "--model_ema"),
    "main_linprobe": ("--finetune", "--teacher", "--optimizer", "--cls_token", "--eval"),
    "main_knn": ("--finetune", "--teacher", "--nb_knn", "--temperature", "--dump_features", "--load_features"),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_has_help_with_its_default_once(name):
    parser = SCRIPTS[name].get_args_parser()
    text = parser.format_help()
    for flag in EXPECTED_FLAGS[name]:
        assert flag in text, flag
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:   # a former name, hidden
            continue
        assert action.help, f"{action.option_strings} has no help text"
        shown = parser._get_formatter()._expand_help(action)
        assert shown.count("default") <= 1, f"{action.option_strings}: {shown}"
        if action.default not in (None, False) and not isinstance(action, argparse._StoreFalseAction):
            assert "default" in shown, f"{action.option_strings} does not show its default: {shown}"
    assert "(default: None)" not in text


@pytest.mark.parametrize("name, registry", [("main_pretrain", models_hpm.PRETRAIN_MODELS),
                                            ("main_finetune", models_vit.CLASSIFIERS),
                                            ("main_knn", models_vit.CLASSIFIERS)])
def test_model_flag_lists_the_registered_names(name, registry):
    model_help = next(a.help for a in SCRIPTS[name].get_args_parser()._actions if "--model" in a.option_strings)
    for model in registry.names():
        assert re.search(rf"\b{model}\b", model_help), model


def test_knn_extracts_features_in_fp32_by_default():
    assert main_knn.get_args_parser().parse_args([]).amp == "none"
