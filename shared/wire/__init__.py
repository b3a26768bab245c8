"""What crosses machines: tensor and composite encodings, signatures, bundles, transport."""
