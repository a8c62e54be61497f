use candle_core::DType;

/// Why a projection could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unsupported weight storage dtype {0:?}: expected F32 or F16")]
    UnsupportedStorageDtype(DType),
    #[error("weight tensor has dtype {0:?}: expected a float dtype")]
    WeightNotFloat(DType),
    #[error("weight tensor has shape {0:?}: expected (out_features, in_features)")]
    WeightRank(Vec<usize>),
    #[error("input has dtype {0:?}: expected F32")]
    InputDtype(DType),
    #[error("input is not on the CPU")]
    InputNotCpu,
    #[error("input has shape {got:?}: expected (n, {expected_in})")]
    InputShape { expected_in: usize, got: Vec<usize> },
    #[error("the {0} kernels are not supported by this CPU")]
    IsaUnsupported(crate::Isa),
    #[error("weight storage holds {0:?} values: expected F32 or F16")]
    UnexpectedStorage(DType),
    #[error("tensor storage is not contiguous after `contiguous()`")]
    NotContiguous,
    #[error("cache row {row} ({width} values from {start}) lies outside a buffer of {len}")]
    RowOutOfBounds {
        row: usize,
        start: usize,
        width: usize,
        len: usize,
    },
    #[error("{what} has {got} values: expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "{what} view of {rows}x{cols} with strides ({row_stride}, {col_stride}) reaches past its {len} values"
    )]
    ViewOutOfBounds {
        what: &'static str,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
        len: usize,
    },
    #[error("matmul shapes do not fit: dst {dst:?} = lhs {lhs:?} x rhs {rhs:?}")]
    MatmulShape {
        dst: (usize, usize),
        lhs: (usize, usize),
        rhs: (usize, usize),
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
