"""FER2013 data: the prepared-data contract, source readers, synthetic faces, the prepare pipeline."""
