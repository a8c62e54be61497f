//! The latentserve gRPC API, generated from `latentserve/v1/*.proto`.

pub mod codec;

/// Package `latentserve.v1`: the client-facing `Inference` service, the internal `Experts`
/// exchange between expert shards, and their messages.
pub mod v1 {
    tonic::include_proto!("latentserve.v1");
}

/// The encoded `FileDescriptorSet` of every latentserve `.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/latentserve_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_describes_the_inference_and_experts_services() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<_> = set
            .file
            .iter()
            .filter(|file| file.package() == "latentserve.v1")
            .flat_map(|file| file.service.iter().map(|s| s.name().to_owned()))
            .collect();
        assert!(services.contains(&"Inference".to_owned()), "{services:?}");
        assert!(services.contains(&"Experts".to_owned()), "{services:?}");
    }
}
