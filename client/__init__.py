"""The data owner's side: enrollment, download, local training, sealing, upload. Data stays here."""
