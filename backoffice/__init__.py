"""The back office: the staff dashboard on the admin index and the ledger's reports (the
accounting identity, every wallet's balance against its entries, every usage record's charge
against its debits, ``manage.py verify_ledger``). It reads every app and is read by none."""
