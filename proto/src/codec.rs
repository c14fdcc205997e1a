//! The gRPC codec of every generated client and server: tonic's prost codec with small per-call
//! buffers. tonic allocates an 8 KiB encode and an 8 KiB decode buffer for every call up front and
//! keeps them for the call's life; a broker holding one `StatusStream` per agent (10,000 agents)
//! held 16 KiB per agent in them for reports and commands of a few hundred bytes. With 1 KiB a
//! larger message grows its buffer as it is encoded or decoded (a few reallocations for an
//! access token or an Admin listing), and the yield threshold stays tonic's. Written by hand
//! because `tonic_prost::ProstCodec` always uses the default buffer settings; the encoder and
//! decoder are tonic-prost's own.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer of one call.
pub const BUFFER_SIZE: usize = 1024;
/// Bytes encoded before a streaming response yields to the transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// tonic-prost's codec with [`BUFFER_SIZE`] buffers (named by `codec_path` in build.rs).
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
