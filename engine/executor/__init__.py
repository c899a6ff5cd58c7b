"""The partitioned executor: GG, CG and CC pieces computed at once over GPU, PCIe and CPU."""
