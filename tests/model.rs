//! Model: shapes for every depth and input, variable names, splits and memory estimates.
use sgr::model::{Arch, FeatureShape, HeadKind, ModelSpec, SplitNet, SplitStrategy, TokenPool};
use tch::{Device, Kind, Tensor};

fn spec(
    arch: Arch,
    modules: usize,
    c: i64,
    s: i64,
    head: HeadKind,
    split: SplitStrategy,
) -> ModelSpec {
    ModelSpec {
        arch,
        modules,
        split,
        head,
        input: FeatureShape::map(c, s, s),
        classes: 10,
        penalty_cost: None,
        options: Default::default(),
        label_smoothing: 0.0,
        local_loss: Default::default(),
    }
}

#[test]
fn every_depth_and_channel_count_gives_logits() {
    for arch in [
        "resnet20".parse::<Arch>().unwrap(),
        "resnet32".parse::<Arch>().unwrap(),
        "resnet56".parse::<Arch>().unwrap(),
        "resnet110".parse::<Arch>().unwrap(),
    ] {
        for (c, s) in [(1, 28), (3, 32)] {
            let net = SplitNet::new(
                &spec(arch.clone(), 2, c, s, HeadKind::Conv, SplitStrategy::Table),
                Device::Cpu,
            )
            .unwrap();
            let x = Tensor::randn([2, c, s, s], (Kind::Float, Device::Cpu));
            assert_eq!(net.forward(&x, false).size(), vec![2, 10], "{arch} {c}x{s}");
            // Module by module equals end to end.
            let mut h = x.shallow_clone();
            for k in 0..net.num_modules() {
                h = net.forward_module(k, &h, false);
                let FeatureShape::Map { c, h: height, w } = net.module_output_shape(k) else {
                    panic!("a ResNet outputs feature maps");
                };
                assert_eq!(h.size(), vec![2, c, height, w]);
                assert_eq!(net.head_logits(k, &h, false).size(), vec![2, 10]);
            }
            let last = net.head_logits(net.num_modules() - 1, &h, false);
            let diff = (last - net.forward(&x, false))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "{diff}");
        }
    }
}

#[test]
fn parameter_counts_match_the_published_resnets() {
    // He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-32 0.46M, ResNet-56 0.85M, ResNet-110 1.7M
    // (with 1x1 projection shortcuts our counts are slightly above the option-A numbers).
    for (arch, millions) in [
        ("resnet20".parse::<Arch>().unwrap(), 0.27),
        ("resnet32".parse::<Arch>().unwrap(), 0.46),
        ("resnet56".parse::<Arch>().unwrap(), 0.85),
        ("resnet110".parse::<Arch>().unwrap(), 1.7),
    ] {
        let net = SplitNet::new(
            &spec(arch.clone(), 1, 3, 32, HeadKind::Conv, SplitStrategy::Table),
            Device::Cpu,
        )
        .unwrap();
        let m = net.parameter_count() as f64 / 1e6;
        assert!((m - millions).abs() / millions < 0.06, "{arch}: {m}M");
    }
}

#[test]
fn variable_names_are_torchvision_style_and_independent_of_k() {
    let one = SplitNet::new(
        &spec(
            "resnet32".parse::<Arch>().unwrap(),
            1,
            3,
            32,
            HeadKind::Conv,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap();
    let eight = SplitNet::new(
        &spec(
            "resnet32".parse::<Arch>().unwrap(),
            8,
            3,
            32,
            HeadKind::Mlp,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap();
    let names_one: std::collections::BTreeSet<String> = one.vs.variables().into_keys().collect();
    for name in eight.vs.variables().keys() {
        assert!(!name.contains("__"), "{name}");
        assert!(
            ["conv1.", "bn1.", "layer", "fc.", "aux."]
                .iter()
                .any(|p| name.starts_with(p)),
            "{name}"
        );
        if !name.starts_with("aux.") {
            assert!(names_one.contains(name), "{name} depends on K");
        }
    }
    assert!(names_one.contains("layer2.0.downsample.0.weight"));
    assert!(names_one.contains("layer3.4.bn2.running_var"));
    // K=8 has 7 auxiliary heads, each named after the last unit of its module.
    let heads = eight.head_parameter_counts();
    assert_eq!(heads.len(), 8);
    assert_eq!(heads[0].0, "aux.1");
    assert_eq!(heads[7].0, "fc");
}

#[test]
fn modules_partition_the_parameters() {
    let net = SplitNet::new(
        &spec(
            "resnet20".parse::<Arch>().unwrap(),
            4,
            1,
            28,
            HeadKind::Conv,
            SplitStrategy::Even,
        ),
        Device::Cpu,
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..4 {
        for (name, _) in net
            .module_variables(k, true)
            .into_iter()
            .chain(net.module_variables(k, false))
        {
            assert!(seen.insert(name.clone()), "{name} is in two modules");
        }
    }
    assert_eq!(seen.len(), net.vs.variables().len());
}

#[test]
fn activation_estimate_falls_with_k_and_balanced_memory_beats_even() {
    let bytes = |k: usize, split: SplitStrategy| {
        let net = SplitNet::new(
            &spec(
                "resnet32".parse::<Arch>().unwrap(),
                k,
                3,
                32,
                HeadKind::Conv,
                split,
            ),
            Device::Cpu,
        )
        .unwrap();
        (0..k)
            .map(|m| net.module_activation_bytes(m, 128))
            .max()
            .unwrap()
    };
    let full = bytes(1, SplitStrategy::Table);
    assert!(bytes(4, SplitStrategy::Table) < full / 2);
    // One block per module: its own ~7 tensors plus input and head against ~66 for the net.
    assert!(bytes(16, SplitStrategy::Table) < full / 5);
    assert!(bytes(4, SplitStrategy::BalancedMemory) <= bytes(4, SplitStrategy::Even));
}

#[test]
fn impossible_splits_are_config_errors() {
    let e = SplitNet::new(
        &spec(
            "resnet32".parse::<Arch>().unwrap(),
            17,
            3,
            32,
            HeadKind::Conv,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("K must be 1..=16"), "{e}");
    let e = SplitNet::new(
        &spec(
            "resnet110".parse::<Arch>().unwrap(),
            6,
            3,
            32,
            HeadKind::Conv,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not in the split table"), "{e}");
}

#[test]
fn mlp_modules_output_vectors_and_chain_to_the_end_to_end_forward() {
    let arch: Arch = "mlp-4x32".parse().unwrap();
    for k in 1..=4 {
        let net = SplitNet::new(
            &spec(
                arch.clone(),
                k,
                1,
                28,
                HeadKind::Linear,
                SplitStrategy::Table,
            ),
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(net.num_modules(), k);
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        let mut h = x.shallow_clone();
        for m in 0..k {
            h = net.forward_module(m, &h, false);
            assert_eq!(net.module_output_shape(m), FeatureShape::Vector { n: 32 });
            assert_eq!(h.size(), vec![3, 32]);
            assert_eq!(net.head_logits(m, &h, false).size(), vec![3, 10]);
        }
        let diff = (net.head_logits(k - 1, &h, false) - net.forward(&x, false))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "K={k}: {diff}");
    }
    // Parameters: 784·32+32 + 3·(32·32+32) linear, 4·64 BN, 32·10+10 classifier, no heads at K=1.
    let one = SplitNet::new(
        &spec(arch, 1, 1, 28, HeadKind::Linear, SplitStrategy::Table),
        Device::Cpu,
    )
    .unwrap();
    let expected = 784 * 32 + 32 + 3 * (32 * 32 + 32) + 4 * 64 + 32 * 10 + 10;
    assert_eq!(one.parameter_count(), expected);
    let names: Vec<String> = one.vs.variables().into_keys().collect();
    assert!(names.iter().any(|n| n == "layers.0.fc.weight"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "layers.3.bn.running_var"),
        "{names:?}"
    );
}

#[test]
fn mlp_splits_go_to_one_layer_per_module_and_no_further() {
    let arch: Arch = "mlp-8x16".parse().unwrap();
    let net = SplitNet::new(
        &spec(
            arch.clone(),
            8,
            1,
            28,
            HeadKind::Linear,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap();
    assert!(
        net.module_ranges()
            .iter()
            .enumerate()
            .all(|(i, r)| *r == (i..i + 1))
    );
    let e = SplitNet::new(
        &spec(
            arch.clone(),
            9,
            1,
            28,
            HeadKind::Linear,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--modules 9") && e.contains("8 hidden layers") && e.contains("1..=8"),
        "{e}"
    );
    // A conv head needs feature maps.
    let e = SplitNet::new(
        &spec(arch, 2, 1, 28, HeadKind::Conv, SplitStrategy::Table),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--aux-head conv") && e.contains("linear"), "{e}");
}

/// A ViT spec for `c`x`s`x`s` inputs with `classes` classes.
fn vit_spec(
    name: &str,
    modules: usize,
    head: HeadKind,
    (c, s): (i64, i64),
    classes: i64,
) -> ModelSpec {
    ModelSpec {
        classes,
        ..spec(
            name.parse::<Arch>().unwrap(),
            modules,
            c,
            s,
            head,
            SplitStrategy::Table,
        )
    }
}

#[test]
fn vit_parameter_counts_match_deit_and_names_follow_timm() {
    // timm's deit_tiny_patch16_224 and deit_small_patch16_224 (224 px, 1000 classes).
    for (name, expected) in [("vit-tiny", 5_717_416), ("vit-small", 22_050_664)] {
        let net = SplitNet::new(
            &vit_spec(name, 1, HeadKind::Linear, (3, 224), 1000),
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(net.parameter_count(), expected, "{name}");
    }
    let names = |k: usize| -> std::collections::BTreeSet<String> {
        let net = SplitNet::new(
            &vit_spec("vit-micro", k, HeadKind::Linear, (1, 28), 10),
            Device::Cpu,
        )
        .unwrap();
        net.vs
            .variables()
            .into_keys()
            .filter(|n| !n.starts_with("aux."))
            .collect()
    };
    let one = names(1);
    for name in [
        "patch_embed.proj.weight",
        "patch_embed.cls_token",
        "patch_embed.pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.5.attn.proj.bias",
        "blocks.5.mlp.fc2.weight",
        "norm.weight",
        "fc.weight",
    ] {
        assert!(one.contains(name), "{name} missing: {one:?}");
    }
    // The backbone's names do not depend on K.
    assert_eq!(names(3), one);
    // 28 px -> patch 4 -> 49 patches + the class token.
    let net = SplitNet::new(
        &vit_spec("vit-micro", 1, HeadKind::Linear, (1, 28), 10),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        net.vs.variables()["patch_embed.pos_embed"].size(),
        vec![1, 50, 128]
    );
}

#[test]
fn vit_splits_are_whole_blocks_and_modules_partition_the_parameters() {
    let arch: Arch = "vit-tiny".parse().unwrap();
    for k in [1usize, 2, 3, 4, 6, 12] {
        let net = SplitNet::new(
            &vit_spec("vit-tiny", k, HeadKind::Linear, (3, 32), 10),
            Device::Cpu,
        )
        .unwrap();
        let ranges = net.module_ranges();
        assert_eq!(ranges.len(), k);
        // Unit 0 (patch embedding) rides with module 1; every module has 12 / K blocks.
        for (i, r) in ranges.iter().enumerate() {
            let blocks = r.len() - usize::from(i == 0);
            assert_eq!(blocks, 12 / k, "K={k} module {i}: {r:?}");
        }
    }
    // Other K up to the depth are even splits; past the depth, a configuration error.
    assert!(sgr::model::splits::check_k(&arch, 5, SplitStrategy::Table).is_ok());
    let e = sgr::model::splits::check_k(&arch, 13, SplitStrategy::Table)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--modules 13"), "{e}");
    for (pool, head) in [
        (TokenPool::Cls, HeadKind::Block),
        (TokenPool::Mean, HeadKind::Mlp),
    ] {
        let mut spec = vit_spec("vit-2x16h2", 3, head, (1, 8), 3);
        spec.split = SplitStrategy::Even;
        spec.options.token_pool = pool;
        let net = SplitNet::new(&spec, Device::Cpu).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..3 {
            for (name, _) in net.module_variables(k, true) {
                assert!(seen.insert(name.clone()), "{name} is in two modules");
            }
        }
        // The classifier's LayerNorm belongs to the last module.
        assert!(
            net.module_variables(2, true)
                .iter()
                .any(|(n, _)| n == "norm.weight")
        );
        assert_eq!(seen.len(), net.vs.variables().len());
        assert_eq!(
            net.vs.variables().contains_key("patch_embed.cls_token"),
            pool == TokenPool::Cls
        );
        let x = Tensor::randn([4, 1, 8, 8], (tch::Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, true).size(), vec![4, 3]);
        let h = net.forward_module(0, &x, true);
        let tokens = 4 + i64::from(pool == TokenPool::Cls);
        assert_eq!(h.size(), vec![4, tokens, 16]);
        assert_eq!(net.head_logits(0, &h, true).size(), vec![4, 3]);
    }
    // Heads that cannot read tokens, and token heads on maps, are refused.
    let conv_on_tokens = SplitNet::new(
        &vit_spec("vit-micro", 2, HeadKind::Conv, (1, 28), 10),
        Device::Cpu,
    );
    assert!(
        conv_on_tokens
            .unwrap_err()
            .to_string()
            .contains("--aux-head conv")
    );
    let block_on_maps = SplitNet::new(
        &spec(
            "resnet20".parse().unwrap(),
            2,
            1,
            28,
            HeadKind::Block,
            SplitStrategy::Table,
        ),
        Device::Cpu,
    );
    assert!(
        block_on_maps
            .unwrap_err()
            .to_string()
            .contains("--aux-head block")
    );
}
