"""
SMS over SMPP 3.4 (DESIGN section 1.8): the PDU codec (L{codec}), the GSM
03.38 / UCS-2 alphabets and message splitting (L{alphabet}), the ESME
client protocol (L{protocol}) and its reconnecting service (L{client}),
and the gateway between accepted mail and short messages (L{gateway}).
"""
