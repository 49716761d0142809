//! The CUDA C sources in `kernels/`, built into the binary, and their
//! compilation by NVRTC: at start-up for the GPU found (`Gpu::new`), and for
//! fixed architectures by `lift kernels-check`, which proves without a GPU
//! that every kernel compiles through the same code path.

use anyhow::{Result, anyhow};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// One kernel file and the functions it defines.
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
    /// Whether the file uses the tensor-core helpers of kernels/mma.cuh.
    pub mma: bool,
}

/// Prepended to every file: bf16 helpers and reductions.
pub const COMMON: &str = include_str!("../../kernels/common.cuh");
/// Prepended after COMMON to the files with `mma: true`: the tensor-core
/// instruction (inline PTX) and its bf16 packing.
pub const MMA: &str = include_str!("../../kernels/mma.cuh");

pub const FILES: &[KernelFile] = &[
    KernelFile {
        name: "embedding.cu",
        source: include_str!("../../kernels/embedding.cu"),
        functions: &["embedding_forward", "embedding_backward"],
        mma: false,
    },
    KernelFile {
        name: "rmsnorm.cu",
        source: include_str!("../../kernels/rmsnorm.cu"),
        functions: &["rmsnorm_forward", "rmsnorm_backward"],
        mma: false,
    },
    KernelFile {
        name: "rope.cu",
        source: include_str!("../../kernels/rope.cu"),
        functions: &["rope_rotate", "rope_rotate_at"],
        mma: false,
    },
    KernelFile {
        name: "attention.cu",
        source: include_str!("../../kernels/attention.cu"),
        functions: &["attention_forward", "attention_delta", "attention_backward_dq", "attention_backward_dkdv"],
        mma: false,
    },
    KernelFile {
        name: "attention_tc.cu",
        source: include_str!("../../kernels/attention_tc.cu"),
        functions: &[
            "attention_forward_tc64",
            "attention_forward_tc128",
            "attention_backward_dq_tc64",
            "attention_backward_dq_tc128",
            "attention_backward_dkdv_tc64",
            "attention_backward_dkdv_tc128",
            "attention_dkdv_sum",
        ],
        mma: true,
    },
    KernelFile {
        name: "decode_attention.cu",
        source: include_str!("../../kernels/decode_attention.cu"),
        functions: &["decode_attention_partial", "decode_attention_merge"],
        mma: false,
    },
    KernelFile {
        name: "decode.cu",
        source: include_str!("../../kernels/decode.cu"),
        functions: &["kv_table_append", "kv_table_select", "gather_rows", "logits_topk"],
        mma: false,
    },
    KernelFile {
        name: "swiglu.cu",
        source: include_str!("../../kernels/swiglu.cu"),
        functions: &["swiglu_forward", "swiglu_backward"],
        mma: false,
    },
    KernelFile {
        name: "residual.cu",
        source: include_str!("../../kernels/residual.cu"),
        functions: &[
            "residual_forward",
            "scale_f32",
            "scale_bf16",
            "f32_to_bf16",
            "bf16_to_f32",
            "f32_to_f64",
            "bf16_to_f64",
            "f64_to_f32",
        ],
        mma: false,
    },
    KernelFile {
        name: "crossentropy.cu",
        source: include_str!("../../kernels/crossentropy.cu"),
        functions: &["crossentropy_forward", "crossentropy_backward"],
        mma: false,
    },
    KernelFile {
        name: "adamw.cu",
        source: include_str!("../../kernels/adamw.cu"),
        functions: &["sparse_adamw", "adamw", "gather_bf16", "gather_add", "sum_squares"],
        mma: false,
    },
    KernelFile {
        name: "dora.cu",
        source: include_str!("../../kernels/dora.cu"),
        functions: &["scale_columns", "column_dot", "dora_norms"],
        mma: false,
    },
    KernelFile {
        name: "lowrank.cu",
        source: include_str!("../../kernels/lowrank.cu"),
        functions: &["randn_splitmix", "cholesky_inverse_transpose"],
        mma: false,
    },
    KernelFile {
        name: "topk.cu",
        source: include_str!("../../kernels/topk.cu"),
        functions: &["radix_histogram", "select_count", "select_write", "reverse_abs_order"],
        mma: false,
    },
];

/// NVRTC's name for the virtual architecture of compute capability (major, minor).
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    // NVRTC wants a &'static str; the capabilities lift knows are listed,
    // anything newer compiles for the newest of them (PTX runs forward).
    match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 10 => "compute_100",
        _ => "compute_80",
    }
}

/// Compiles one kernel file to PTX for `arch` (e.g. "compute_90").
pub fn compile(file: &KernelFile, arch: &'static str) -> Result<Ptx> {
    let mma = if file.mma { MMA } else { "" };
    let src = format!("{COMMON}\n{mma}\n#line 1 \"{}\"\n{}", file.name, file.source);
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        name: Some(file.name.into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            anyhow!("NVRTC failed:\n{}", log.to_string_lossy())
        }
        other => anyhow!("NVRTC failed: {other:?}"),
    })
}

/// `lift kernels-check`: compiles every kernel file for each architecture,
/// prints the compile time of each, writes the PTX to `ptx_dir` (for ptxas
/// to report registers and spills) and fails on any error.
pub fn check(archs: &[&'static str], ptx_dir: Option<&std::path::Path>) -> Result<()> {
    // SAFETY: only tries to dlopen the library by name.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        anyhow::bail!("kernels-check: cannot load libnvrtc.so.13 (put the NVRTC library on LD_LIBRARY_PATH)");
    }
    if let Some(d) = ptx_dir {
        std::fs::create_dir_all(d)?;
    }
    let mut failed = 0;
    for &arch in archs {
        for f in FILES {
            let t0 = std::time::Instant::now();
            match compile(f, arch) {
                Ok(ptx) => {
                    let text = ptx.to_src();
                    let missing: Vec<_> =
                        f.functions.iter().filter(|n| !text.contains(&format!(".entry {n}("))).collect();
                    if !missing.is_empty() {
                        eprintln!("FAIL {arch} {}: no entry for {missing:?}", f.name);
                        failed += 1;
                        continue;
                    }
                    eprintln!("ok   {arch} {:<18} {:>6.0} ms", f.name, t0.elapsed().as_secs_f64() * 1e3);
                    if let Some(d) = ptx_dir {
                        let stem = f.name.trim_end_matches(".cu");
                        std::fs::write(d.join(format!("{stem}.{arch}.ptx")), text)?;
                    }
                }
                Err(e) => {
                    eprintln!("FAIL {arch} {}: {e}", f.name);
                    failed += 1;
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} kernel compilations failed");
    }
    Ok(())
}
