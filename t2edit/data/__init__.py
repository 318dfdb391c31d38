"""Edit records and the loaders that read them."""
from .loaders import (DataFormatError, DataSourceNotFoundError, LoadStats, dataset_to_records, load_edit_dataset,
                      load_records, records_to_dataset, save_records)
from .records import EditRecord, Probe

__all__ = ["DataFormatError", "DataSourceNotFoundError", "EditRecord", "LoadStats", "Probe", "dataset_to_records",
           "load_edit_dataset", "load_records", "records_to_dataset", "save_records"]
