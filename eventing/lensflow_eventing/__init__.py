"""eventing: the event contracts, Kafka producing and reading, and the local KafkaSource
(dispatcher). Builds on lensflow_core only and takes explicit names, never the Config."""
