from twisted.application.service import ServiceMaker

smartrelay = ServiceMaker(
    "smartrelay",
    "smartrelay.tap",
    "Transactional e-mail and SMS relay (SMTP in, durable spool, delivery)",
    "smartrelay",
)
